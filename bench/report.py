#!/usr/bin/env python3
"""Turns the load generator's JSON lines into BENCHMARKS.md: one table per scenario and
the ratios of channelgate to each peer, with the machine and the date."""

import datetime
import json
import os
import platform
import sys

SYSTEMS = ["channelgate", "raw", "django"]
NAMES = {
    "channelgate": "channelgate",
    "raw": "raw broadcaster (tokio + tungstenite)",
    "django": "Django Channels 4 + channels_redis + daphne",
}


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}"


def ratio(a, b):
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f}x"


def fmt(value, digits=0):
    if value is None:
        return "n/a"
    if isinstance(value, float) and digits:
        return f"{value:.{digits}f}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def by_system(rows, scenario):
    """Each system's rows of one scenario, in the order they ran (one per round)."""
    found = {}
    for r in rows:
        if r.get("scenario") == scenario:
            found.setdefault(r["system"], []).append(r)
    return found


def label(system, runs, i):
    return NAMES[system] if len(runs) == 1 else f"{NAMES[system]}, round {i + 1}"


def median(runs, key):
    values = sorted(r.get(key) or 0 for r in runs)
    if not values:
        return 0
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def ratio_lines(found, key, unit, out):
    """channelgate against each peer, on the medians over rounds."""
    if "channelgate" not in found:
        return
    rounds = len(found["channelgate"])
    over = " (medians over rounds)" if rounds > 1 else ""
    for peer in ("raw", "django"):
        if peer in found:
            out.append("")
            out.append(
                f"channelgate / {NAMES[peer]}: "
                f"{ratio(median(found['channelgate'], key), median(found[peer], key))} {unit}{over}"
            )


def fanout_table(rows, scenario, title, out):
    found = by_system(rows, scenario)
    if not found:
        return
    out.append(f"## {scenario}: {title}\n")
    out.append("| system | deliveries/s (best sustained) | p50 at half (ms) | p99 at half (ms) | CPU at best | server RSS | server RSS / connections |")
    out.append("|---|---|---|---|---|---|---|")
    for system in SYSTEMS:
        runs = found.get(system, [])
        for i, r in enumerate(runs):
            name = label(system, runs, i)
            per_conn = r["rss_kib"] / r["conns"] if r.get("conns") else None
            if not r["deliveries_per_sec"]:
                out.append(
                    f"| {name} | not sustained: at {fmt(r['unsustained_rate'])}/s, "
                    f"{fmt(r['unsustained_received'])} of {fmt(r['unsustained_expected'])} arrived | "
                    f"{r['unsustained_p50_ms']:.2f} (at that rate) | {r['unsustained_p99_ms']:.2f} (at that rate) | "
                    f"{fmt(r['cpu_percent_at_best'])}% | {r['rss_kib'] / 1024:.0f} MiB | {per_conn:.1f} KiB |"
                )
                continue
            out.append(
                f"| {name} | {fmt(r['deliveries_per_sec'])} | {r['p50_ms_at_half']:.2f} | "
                f"{r['p99_ms_at_half']:.2f} | {fmt(r['cpu_percent_at_best'])}% | "
                f"{r['rss_kib'] / 1024:.0f} MiB | {per_conn:.1f} KiB |"
            )
    ratio_lines(found, "deliveries_per_sec", "deliveries/s", out)
    lost = [
        f"{label(s, runs, i)}: {r['lost_in_failed_step']}"
        for s, runs in found.items()
        for i, r in enumerate(runs)
        if r.get("lost_in_failed_step")
    ]
    if lost:
        out.append("")
        out.append("Undelivered in the step that failed (the rate above it): " + ", ".join(lost) + ".")
    closed = [
        f"{label(s, runs, i)}: {r['slow_consumer_closes']}"
        for s, runs in found.items()
        for i, r in enumerate(runs)
        if r.get("slow_consumer_closes")
    ]
    out.append("")
    out.append(
        "Sockets closed as slow consumers: " + (", ".join(closed) + "." if closed else "none.")
    )
    out.append("")


def main():
    path, target = sys.argv[1], sys.argv[2]
    rows = load(path)
    out = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {datetime.date.today().isoformat()}, {machine()}. The server",
        "under test runs on core 0, the load generator (`bench/`, release build) on core 1; every",
        "system gets the same sockets, pages and payloads (200 bytes, stamped with their send time).",
        "Rates rise by 1.4x per step until a step loses events or its p99 passes 100 ms (S3: one",
        "second); two geometric halvings between the last sustained and the failed rate then narrow",
        "the limit to within 9 %, and latency is measured at half the best sustained rate.",
        "Latencies are histogrammed up to one second: 1000 ms means a second or more. S4 is the",
        "opening of S1's 10,000 sockets; S2's two counts are read from one opening. S1, S3 and S4",
        "run in rounds with channelgate and the raw broadcaster taking turns (Django once); each",
        "round has its row and the ratios are of the medians. The load generator reads with its own",
        "framing (`bench/src/client.rs`) so that it is not what limits a table. A shared machine:",
        "read the ratios, not the absolute numbers.",
        "",
    ]
    fanout_table(rows, "S1", "fan-out, 10,000 connections in 100 groups of 100", out)
    idle = [r for r in rows if r.get("scenario") == "S2"]
    if idle:
        out.append("## S2: idle authenticated connections with one page each\n")
        out.append("| system | connections | server RSS before | after | RSS per connection |")
        out.append("|---|---|---|---|---|")
        for system in SYSTEMS:
            for r in sorted((r for r in idle if r["system"] == system), key=lambda r: r["conns"]):
                out.append(
                    f"| {NAMES[system]} | {r['conns']:,} | {r['rss_kib_before'] / 1024:.1f} MiB | "
                    f"{r['rss_kib_after'] / 1024:.1f} MiB | {r['kib_per_conn']:.1f} KiB |"
                )
        per_conn = {(r["system"], r["conns"]): r["kib_per_conn"] for r in idle}
        for peer in ("raw", "django"):
            for conns in sorted({r["conns"] for r in idle}):
                cg, other = per_conn.get(("channelgate", conns)), per_conn.get((peer, conns))
                if cg and other:
                    out.append("")
                    out.append(f"channelgate / {NAMES[peer]} at {conns:,}: {ratio(cg, other)} RSS per connection")
        out.append("")
    fanout_table(rows, "S3", "one hot group of 5,000", out)
    storm = by_system(rows, "S4")
    if storm:
        out.append("## S4: connect storm, 10,000 connects and subscribes as fast as they go\n")
        out.append("| system | handshakes/s | seconds to the last page_add | server CPU |")
        out.append("|---|---|---|---|")
        for system in SYSTEMS:
            runs = storm.get(system, [])
            for i, r in enumerate(runs):
                out.append(
                    f"| {label(system, runs, i)} | {fmt(r['handshakes_per_sec'])} | "
                    f"{r['seconds_to_last_page_add']:.2f} | {fmt(r['cpu_percent'])}% |"
                )
        ratio_lines(storm, "handshakes_per_sec", "handshakes/s", out)
        out.append("")
    fanout_table(rows, "S5", "S1 across two channelgate nodes through Redis", out)
    s1 = by_system(rows, "S1")
    s5 = by_system(rows, "S5")
    if "channelgate" in s5 and "channelgate" in s1:
        out.append(
            "Two nodes / one node (S5 / median of S1's channelgate rounds): "
            f"{ratio(median(s5['channelgate'], 'deliveries_per_sec'), median(s1['channelgate'], 'deliveries_per_sec'))}"
        )
        out.append("")
    with open(target, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
