#!/usr/bin/env python3
"""P1's table (bench/presence.sh): the load generator's JSON lines for presence off, on, and
on across two nodes, side by side, each cell the median over rounds with the lowest and
highest round. Prints the markdown and writes it to the file given."""

import datetime
import json
import os
import platform
import sys

SETUPS = [
    ("off", 1, "one node, presence off"),
    ("on", 1, "one node, presence on"),
    ("on", 2, "two nodes on Redis, presence on"),
]


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def cell(runs, key, digits=0, scale=1):
    """Median (lowest to highest) of `key` over the runs that have it."""
    values = [r[key] * scale for r in runs if r.get(key) is not None]
    if not values:
        return "n/a"
    show = lambda v: f"{v:,.{digits}f}"
    if len(values) == 1:
        return show(values[0])
    return f"{show(median(values))} ({show(min(values))}–{show(max(values))})"


def all_runs(runs, check):
    """How many runs pass `check`, as "all 3" or "1 of 3"."""
    good = sum(1 for r in runs if check(r))
    return f"all {len(runs)}" if good == len(runs) else f"{good} of {len(runs)}"


def main():
    path, target = sys.argv[1], sys.argv[2]
    rows = [r for r in load(path) if r.get("scenario") == "P1"]
    if not rows:
        sys.exit(f"no P1 results in {path}")
    found = [
        (name, [r for r in rows if r["presence"] == presence and r["nodes"] == nodes])
        for presence, nodes, name in SETUPS
    ]
    found = [(name, runs) for name, runs in found if runs]
    first = rows[0]
    n = first["sockets"]
    focus = next((r for r in rows if "focus_sent" in r), None)
    rounds = max(len(runs) for _, runs in found)
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = [
        "# P1: presence in one space",
        "",
        f"Measured by `bash bench/presence.sh` on {datetime.date.today().isoformat()}, "
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}.",
        f"{n:,} signed-in members (each its own user) subscribe to table 1 at once (512 in flight); "
        "the storm is timed from the first connect to the last `presence.members` (presence off: "
        "the last `page_add`). Every member must learn of every other once, from its "
        "`presence.members` entries and the `presence.join` frames after it.",
    ]
    if focus:
        out.append(
            f"Then {focus['focus_senders']} members each send a `row` focus "
            f"{focus['focus_rate_per_sender']:g} times a second for {focus['focus_secs']:g} s "
            f"(the send time in `row_id`), and every other member times each `presence.focus`; "
            "latencies are histogrammed up to one second."
        )
    out += [
        "Every channelgate runs `--workers 1` on core 0, with the redis-server there too; the load "
        "generator runs on core 1 (its own CPU is shown: near 100 % it may be what a row measures). "
        f"Each cell: the median over {rounds} rounds (the setups taking turns, each started afresh), "
        "then the lowest and highest round. A shared machine: read the columns against each "
        "other, not the absolute numbers.",
        "",
        "| | " + " | ".join(name for name, _ in found) + " |",
        "|---" * (len(found) + 1) + "|",
    ]
    lines = [
        ("storm: s to the last `presence.members` (off: `page_add`)", "storm_secs", 3),
        ("storm: s to the median socket's", "storm_median_socket_secs", 3),
        ("storm: sockets/s", "storm_sockets_per_sec", 0),
        ("storm: `presence.join` frames received", "join_frames", 0),
        ("storm: s to the last join (full view)", "full_view_secs", 3),
        ("storm: server CPU %", "storm_cpu_percent", 0),
        ("storm: load generator CPU %", "loadgen_storm_cpu_percent", 0),
        ("focus: frames sent", "focus_sent", 0),
        ("focus: deliveries expected", "focus_expected", 0),
        ("focus: deliveries received", "focus_received", 0),
        ("focus: deliveries/s", "focus_per_sec", 0),
        ("focus: p50 ms", "focus_p50_ms", 2),
        ("focus: p99 ms", "focus_p99_ms", 2),
        ("focus: max ms", "focus_max_ms", 2),
        ("focus: server CPU %", "focus_cpu_percent", 0),
        ("focus: load generator CPU %", "loadgen_focus_cpu_percent", 0),
        ("server RSS MiB (at the end)", "rss_kib", 1, 1 / 1024),
    ]
    for label, key, digits, *scale in lines:
        cells = [cell(runs, key, digits, *scale) for _, runs in found]
        if all(c == "n/a" for c in cells):
            continue
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    checks = [
        (
            "every member learnt of every other, once",
            lambda r: r["sockets_knowing_fewer"] == 0 and r["sockets_knowing_more"] == 0,
        ),
        (
            "every focus reached every other member, once",
            lambda r: "focus_sent" not in r or r["sockets_with_wrong_focus_count"] == 0,
        ),
        ("no unexpected frame, no socket closed", lambda r: not r["unexpected_frames"] and not r["closed_sockets"]),
    ]
    for label, check in checks:
        out.append(f"| runs where {label} | " + " | ".join(all_runs(runs, check) for _, runs in found) + " |")
    odd = [
        f"{name}, round {r['round']}: {r['unexpected_frames']} unexpected frames (first: "
        f"`{r['first_unexpected']}`), {r['closed_sockets']} closed sockets, "
        f"{r['sockets_knowing_fewer']} sockets knowing fewer and {r['sockets_knowing_more']} more "
        f"than {n - 1:,} others, {r.get('sockets_with_wrong_focus_count', 0)} with a wrong focus count"
        for name, runs in found
        for r in runs
        if r["unexpected_frames"] or r["closed_sockets"] or r["sockets_knowing_fewer"]
        or r["sockets_knowing_more"] or r.get("sockets_with_wrong_focus_count")
    ]
    if odd:
        out += ["", "Problems:", ""] + [f"- {line}" for line in odd]
    missing = [name for presence, nodes, name in SETUPS if name not in dict(found)]
    if missing:
        out += ["", "No result (the run failed; see its log above): " + ", ".join(missing) + "."]
    text = "\n".join(out) + "\n"
    with open(target, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
