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


def fanout_table(rows, scenario, title, out):
    found = {r["system"]: r for r in rows if r.get("scenario") == scenario}
    if not found:
        return
    out.append(f"## {scenario}: {title}\n")
    out.append("| system | deliveries/s (best sustained) | p50 at half (ms) | p99 at half (ms) | CPU at best | server RSS | server RSS / connections |")
    out.append("|---|---|---|---|---|---|---|")
    for system in SYSTEMS:
        r = found.get(system)
        if not r:
            continue
        per_conn = r["rss_kib"] / r["conns"] if r.get("conns") else None
        if not r["deliveries_per_sec"]:
            out.append(
                f"| {NAMES[system]} | not sustained: at {fmt(r['unsustained_rate'])}/s, "
                f"{fmt(r['unsustained_received'])} of {fmt(r['unsustained_expected'])} arrived | "
                f"{r['unsustained_p50_ms']:.2f} (at that rate) | {r['unsustained_p99_ms']:.2f} (at that rate) | "
                f"{fmt(r['cpu_percent_at_best'])}% | {r['rss_kib'] / 1024:.0f} MiB | {per_conn:.1f} KiB |"
            )
            continue
        out.append(
            f"| {NAMES[system]} | {fmt(r['deliveries_per_sec'])} | {r['p50_ms_at_half']:.2f} | "
            f"{r['p99_ms_at_half']:.2f} | {fmt(r['cpu_percent_at_best'])}% | "
            f"{r['rss_kib'] / 1024:.0f} MiB | {per_conn:.1f} KiB |"
        )
    cg = found.get("channelgate")
    if cg:
        for peer in ("raw", "django"):
            if peer in found:
                out.append("")
                out.append(
                    f"channelgate / {NAMES[peer]}: {ratio(cg['deliveries_per_sec'], found[peer]['deliveries_per_sec'])} deliveries/s"
                )
    lost = [f"{s}: {r['lost_in_failed_step']}" for s, r in found.items() if r.get("lost_in_failed_step")]
    if lost:
        out.append("")
        out.append("Undelivered in the step that failed (the rate above it): " + ", ".join(lost) + ".")
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
        "opening of S1's 10,000 sockets; S2's two counts are read from one opening. The load",
        "generator reads with its own framing (`bench/src/client.rs`) so that it is not what limits",
        "a table. One run on a shared machine:",
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
    storm = {r["system"]: r for r in rows if r.get("scenario") == "S4"}
    if storm:
        out.append("## S4: connect storm, 10,000 connects and subscribes as fast as they go\n")
        out.append("| system | handshakes/s | seconds to the last page_add | server CPU |")
        out.append("|---|---|---|---|")
        for system in SYSTEMS:
            if system in storm:
                r = storm[system]
                out.append(
                    f"| {NAMES[system]} | {fmt(r['handshakes_per_sec'])} | {r['seconds_to_last_page_add']:.2f} | {fmt(r['cpu_percent'])}% |"
                )
        if "channelgate" in storm:
            for peer in ("raw", "django"):
                if peer in storm:
                    out.append("")
                    out.append(
                        f"channelgate / {NAMES[peer]}: {ratio(storm['channelgate']['handshakes_per_sec'], storm[peer]['handshakes_per_sec'])} handshakes/s"
                    )
        out.append("")
    fanout_table(rows, "S5", "S1 across two channelgate nodes through Redis", out)
    s1 = {r["system"]: r for r in rows if r.get("scenario") == "S1"}
    s5 = [r for r in rows if r.get("scenario") == "S5"]
    if s5 and "channelgate" in s1:
        out.append(
            f"Two nodes / one node (S5 / S1): {ratio(s5[0]['deliveries_per_sec'], s1['channelgate']['deliveries_per_sec'])}"
        )
        out.append("")
    with open(target, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
