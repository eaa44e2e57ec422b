"""Publish latency through the Django layer: `group_send` (as Baserow's tasks call it,
through `async_to_sync`) until a subscribed WebSocket has the frame, one at a time.

    .venv/bin/python bench/publish_latency.py [--count 1000] [--binary PATH]

Starts its own channelgate node (CHANNELGATE_BIN or the repository's debug build; a
release build is faster) with the static authorizer, and prints p50, p99 and max, then
the same for `Client.publish_to_group` alone (what the layer adds is the difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from helpers import API_KEY, Gateway, token  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--binary", help="channelgate binary (default: CHANNELGATE_BIN)")
    args = parser.parse_args()
    if args.binary:
        os.environ["CHANNELGATE_BIN"] = args.binary

    log = Path(tempfile.mkdtemp()) / "channelgate.log"
    node = Gateway(log=log)
    try:
        import django
        from django.conf import settings

        settings.configure(
            CHANNEL_LAYERS={
                "default": {
                    "BACKEND": "channelgate.django.ChannelgateLayer",
                    "CONFIG": {"target": node.target, "api_key": API_KEY},
                }
            }
        )
        django.setup()
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        sock = node.socket(token(1))
        assert sock.subscribe("table", table_id=1)["type"] == "page_add"

        def layer_publish(n: int) -> None:
            message = {"type": "broadcast_to_group", "payload": {"type": "bench", "n": n}}
            async_to_sync(layer.group_send)("table-1", message)

        def client_publish(n: int) -> None:
            layer.client.publish_to_group("table-1", {"type": "bench", "n": n})

        for name, publish in (("group_send", layer_publish), ("Client", client_publish)):
            samples = []
            for n in range(args.count + 50):
                started = time.perf_counter()
                publish(n)
                frame = sock.recv()
                elapsed = time.perf_counter() - started
                assert frame["n"] == n, frame
                if n >= 50:  # the first ones warm the channel and the sender up
                    samples.append(elapsed * 1000)
            samples.sort()
            p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
            print(
                f"{name} -> socket, {len(samples)} publishes: "
                f"p50 {statistics.median(samples):.2f} ms, p99 {p99:.2f} ms, "
                f"max {samples[-1]:.2f} ms"
            )
        sock.close()
        assert layer.drain(5) and layer.stats["gave_up"] == layer.stats["invalid"] == 0, (
            layer.stats
        )
    finally:
        node.stop()


if __name__ == "__main__":
    main()
