"""The committed stubs are what proto/ gives with the pinned generator, byte for byte."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
COMMITTED = PACKAGE / "channelgate" / "v1"


def test_stubs_match_proto(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "generate_stubs", PACKAGE / "tools" / "generate_stubs.py"
    )
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    generated = tool.generate(tmp_path)
    assert generated, "protoc wrote nothing"
    assert sorted(p.name for p in COMMITTED.glob("*_pb2*")) == [p.name for p in generated]
    stale = [
        p.name for p in generated if p.read_bytes() != (COMMITTED / p.name).read_bytes()
    ]
    assert not stale, f"{', '.join(stale)} differ from proto/: run tools/generate_stubs.py"
