"""Publishes benchmark events to the Django peer's sockets through the Channels layer.

Each event is a `group_send` of {"type": "broadcast_to_group", "payload": {...}} to one of
the groups table-0 .. table-(G-1), round robin, the way Baserow's backend broadcasts.
The payload carries the send time in microseconds since the Unix epoch (`ts`) so that a
client can measure publish-to-receive latency.

Stdout gets one line at the end, `published N in S seconds`; errors go to stderr with a
non-zero exit. Needs REDIS_URL, like the server.

    publisher.py --groups 1 --count 1000 --rate 100 --size 256
"""

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchpeer.settings")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1, help="groups table-0 .. table-(G-1)")
    parser.add_argument("--rate", type=float, default=0, help="events per second, 0 = unpaced")
    parser.add_argument("--count", type=int, default=1, help="events in all")
    parser.add_argument("--size", type=int, default=0, help="approximate payload bytes")
    parser.add_argument(
        "--file",
        help="publish these events instead, one JSON line each, "
        '{"group": G, "payload": "<text>"}: the text goes to table-G as it is (--groups, '
        "--count and --size are then unused)",
    )
    parser.add_argument(
        "--event-ids",
        action="store_true",
        help="with --file: append an event id to each payload as its last key, "
        '`,"_event_id":N`, from a counter in the layer\'s Redis (one sequence per '
        "deployment), as Baserow's backend does when it records events for replay",
    )
    args = parser.parse_args()
    if args.groups < 1:
        parser.error("--groups must be at least 1")
    if args.rate < 0 or args.count < 0 or args.size < 0:
        parser.error("--rate, --count and --size must not be negative")
    return args


def pad_length(args):
    """Pad that brings the payload's compact JSON, as the consumer sends it, to about
    --size bytes (one pad length for all events)."""
    sample = {"type": "bench", "n": args.count, "ts": now_us(), "g": args.groups - 1, "pad": ""}
    return max(0, args.size - len(json.dumps(sample, separators=(",", ":"))))


def now_us():
    return time.time_ns() // 1000


async def publish_file(args):
    """The events of --file in order, paced by --rate, each text sent as it is."""
    from channels.layers import get_channel_layer

    with open(args.file) as f:
        events = [json.loads(line) for line in f if line.strip()]
    layer = get_channel_layer()
    ids = None
    if args.event_ids:
        from redis.asyncio import Redis

        ids = Redis.from_url(os.environ["REDIS_URL"])
    interval = 1 / args.rate if args.rate > 0 else 0
    start = time.monotonic()
    try:
        for n, event in enumerate(events):
            if interval:
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            text = event["payload"]
            if ids is not None:
                event_id = await ids.incr("bench:event-id")
                text = f'{text.rstrip()[:-1]},"_event_id":{event_id}}}'
            await layer.group_send(
                f"table-{event['group']}", {"type": "broadcast_to_group", "text": text}
            )
        return len(events), time.monotonic() - start
    finally:
        if ids is not None:
            await ids.aclose()
        await layer.close_pools()


async def publish(args):
    if args.file:
        return await publish_file(args)
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    pad = "x" * pad_length(args)
    interval = 1 / args.rate if args.rate > 0 else 0
    start = time.monotonic()
    try:
        for n in range(args.count):
            if interval:
                # Absolute schedule: event n is due at start + n * interval, so a late
                # send does not push back the ones after it.
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            g = n % args.groups
            payload = {"type": "bench", "n": n, "ts": now_us(), "g": g, "pad": pad}
            await layer.group_send(
                f"table-{g}", {"type": "broadcast_to_group", "payload": payload}
            )
        return args.count, time.monotonic() - start
    finally:
        await layer.close_pools()


def main():
    args = parse_args()
    try:
        import django

        django.setup()
        count, seconds = asyncio.run(publish(args))
    except Exception as error:  # noqa: BLE001 - any failure is reported the same way
        print(f"publisher: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"published {count} in {seconds:.3f} seconds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
