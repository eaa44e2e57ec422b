"""Writes the event streams of the compression benchmark (bench/compression.sh), one JSON
line per event, {"group": G, "payload": "<the frame's text>"}, in publishing order; each
group is a table watched by sockets of its own.

session-1, session-20: the event frames that the real Baserow sockets A, B and D-member of
    ../shared/data/baserow-session-frames.json received, in order, each socket's to a group
    of its own (three groups); the frames the server makes itself (authentication,
    page_add, page_discard) are left out. Compact JSON, as the backend publishes it (the
    file's frames total 5,651 bytes that way). session-1 is the session once, as recorded;
    session-20 plays it 20 times in rotation over the three sockets, each pass with other
    ids and timestamps (ids shifted, microseconds changed), as a longer session of the same
    kinds of events would be.
rows: a table-update stream to one group: `rows_updated` events of one row with 20 fields
    (text, numbers, booleans, dates, a single select, a link, nulls), each changing one
    field of one of 50 rows, with the row before and after as Baserow sends them.

    compression_streams.py SESSION_FILE OUT_DIR [--rows-events N]
"""

import argparse
import json
import os
import random
import re

SERVER_MADE = {"authentication", "page_add", "page_discard"}
SOCKETS = ["A", "B", "D-member"]
TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:)(\d\d)\.(\d{6})Z$")


def compact(value):
    return json.dumps(value, separators=(",", ":"))


def shifted(value, k, key=None):
    """The frame as pass `k` of a longer session would carry it: integer ids moved up by
    7 per pass, timestamps a little later, everything else as it was."""
    if isinstance(value, dict):
        return {name: shifted(item, k, name) for name, item in value.items()}
    if isinstance(value, list):
        return [shifted(item, k, key) for item in value]
    if isinstance(value, bool) or k == 0:
        return value
    if isinstance(value, int) and key is not None and (key == "id" or key.endswith("_id") or key.endswith("_ids")):
        return value + 7 * k
    if isinstance(value, str):
        match = TIMESTAMP.match(value)
        if match:
            seconds = (int(match.group(2)) + 3 * k) % 60
            micros = (int(match.group(3)) * 7919 + 104729 * k) % 1_000_000
            return f"{match.group(1)}{seconds:02d}.{micros:06d}Z"
    return value


def session(frames_file, passes):
    with open(frames_file) as f:
        sockets = json.load(f)["sockets"]
    events = []
    for k in range(passes):
        streams = [
            [compact(shifted(frame, k)) for frame in sockets[name] if frame.get("type") not in SERVER_MADE]
            for name in SOCKETS
        ]
        # In rotation: the sockets' n-th events one after another.
        for n in range(max(len(s) for s in streams)):
            for group, stream in enumerate(streams):
                if n < len(stream):
                    events.append({"group": group + 1, "payload": stream[n]})
    return events


FIELDS = [
    ("text", "Name"), ("long_text", "Notes"), ("number", "Quantity"), ("number", "Price"),
    ("boolean", "Done"), ("date", "Due"), ("single_select", "Status"), ("text", "Owner"),
    ("email", "Email"), ("url", "Link"), ("rating", "Rating"), ("number", "Estimate"),
    ("text", "City"), ("date", "Started"), ("boolean", "Blocked"), ("link_row", "Project"),
    ("text", "Code"), ("phone", "Phone"), ("number", "Percent"), ("text", "Tag"),
]
WORDS = ("alpha beta gamma delta review ship draft invoice order customer supplier meeting "
         "budget launch report design backend frontend copy migrate table row field").split()
STATUSES = [{"id": 1, "value": "Open", "color": "blue"}, {"id": 2, "value": "In progress", "color": "yellow"},
            {"id": 3, "value": "Done", "color": "green"}, {"id": 4, "value": "Blocked", "color": "red"}]


def field_value(rng, kind):
    if kind == "text":
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    if kind == "long_text":
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
    if kind == "number":
        return f"{rng.randint(0, 100000) / 100:.2f}"
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "date":
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == "single_select":
        return rng.choice(STATUSES)
    if kind == "email":
        return f"{rng.choice(WORDS)}.{rng.randint(1, 999)}@example.com"
    if kind == "url":
        return f"https://example.com/{rng.choice(WORDS)}/{rng.randint(1, 9999)}"
    if kind == "rating":
        return rng.randint(0, 5)
    if kind == "link_row":
        return [{"id": rng.randint(1, 40), "value": f"Project {rng.randint(1, 40)}", "order": "1.00000000000000000000"}]
    if kind == "phone":
        return f"+31 6 {rng.randint(10000000, 99999999)}"
    raise ValueError(kind)


def rows(count, seed=21):
    rng = random.Random(seed)
    table = {}
    for row_id in range(1, 51):
        row = {"id": row_id, "order": f"{row_id}.00000000000000000000"}
        for n, (kind, _) in enumerate(FIELDS, start=1):
            row[f"field_{n}"] = None if rng.random() < 0.1 else field_value(rng, kind)
        table[row_id] = row
    events = []
    for _ in range(count):
        row_id = rng.randint(1, 50)
        before = table[row_id]
        n = rng.randint(1, len(FIELDS))
        after = dict(before)
        after[f"field_{n}"] = field_value(rng, FIELDS[n - 1][0])
        table[row_id] = after
        frame = {"type": "rows_updated", "table_id": 1, "rows_before_update": [before], "rows": [after],
                 "metadata": {}, "updated_field_ids": [n]}
        events.append({"group": 1, "payload": compact(frame)})
    return events


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("session_file")
    parser.add_argument("out_dir")
    parser.add_argument("--rows-events", type=int, default=300)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    streams = {
        "session-1": session(args.session_file, 1),
        "session-20": session(args.session_file, 20),
        "rows": rows(args.rows_events),
    }
    for name, events in streams.items():
        path = os.path.join(args.out_dir, f"{name}.jsonl")
        with open(path, "w") as f:
            for event in events:
                f.write(json.dumps(event) + "\n")
        plain = sum(len(e["payload"]) for e in events)
        print(f"{path}: {len(events)} events, {plain} payload bytes")


if __name__ == "__main__":
    main()
