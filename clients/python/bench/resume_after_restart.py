"""How soon calls succeed again after the gateway is killed and started again.

A real channelgate node (CHANNELGATE_BIN, else the repository's debug build) is killed
with SIGKILL; for `--outage` seconds a client keeps calling (each call retrying until its
deadline, as a backend would); then the node starts again on the same ports, and the
figure is the time from the node answering /readyz to the first successful Publish.
Measured with the package's channel replacement and without it (`reconnect_interval=
None`: one grpc channel kept throughout, as grpcio handles it alone).

    .venv/bin/python bench/resume_after_restart.py [--rounds 5] [--outage 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import API_KEY, Gateway  # noqa: E402

from channelgate import ChannelgateError, Client  # noqa: E402


def one_round(node: Gateway, replace: bool, outage: float, limit: float) -> float:
    client = Client(
        node.target,
        api_key=API_KEY,
        timeout=1.0,
        reconnect_interval=0.5 if replace else None,
    )
    client.publish_to_all_users({"type": "x"}, record=False)
    assert node.process is not None
    node.process.kill()
    node.process.wait()
    until = time.monotonic() + outage
    while time.monotonic() < until:
        try:
            client.publish_to_all_users({"type": "x"}, record=False, timeout=0.5)
        except ChannelgateError:
            pass
    node.start()
    answering = time.monotonic()
    while True:
        try:
            client.publish_to_all_users({"type": "x"}, record=False, timeout=1.0)
            break
        except ChannelgateError:
            if time.monotonic() - answering > limit:
                break
    client.close()
    return time.monotonic() - answering


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--outage", type=float, default=3.0, help="seconds down")
    parser.add_argument("--limit", type=float, default=90.0, help="give up after")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        node = Gateway(log=Path(folder) / "channelgate.log")
        try:
            for replace in (True, False):
                figures = [
                    one_round(node, replace, args.outage, args.limit)
                    for _ in range(args.rounds)
                ]
                print(
                    f"grpcio {grpc.__version__}, channel replacement "
                    f"{'on ' if replace else 'off'}: first call succeeded after the "
                    f"restart in median {statistics.median(figures) * 1000:.0f} ms, "
                    f"max {max(figures) * 1000:.0f} ms "
                    f"({args.rounds} restarts, {args.outage:g} s outage each)",
                    flush=True,
                )
        finally:
            node.stop()


if __name__ == "__main__":
    main()
