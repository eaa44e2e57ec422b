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


H1_SETUPS = {1: "one node, in-memory history", 2: "two nodes on Redis, history in Redis streams"}


def on_off_ratio(runs, key):
    """History on / off, on the medians over rounds."""
    on = [r for r in runs if r.get("history") == "on"]
    off = [r for r in runs if r.get("history") == "off"]
    if not on or not off:
        return "n/a"
    return ratio(median(on, key), median(off, key))


def history_cost(rows, out):
    found = [r for r in rows if r.get("scenario") == "H1"]
    if not found:
        return
    first = found[0]
    out.append("## H1: publish cost, history on against off\n")
    out.append(
        f"A fixed-rate fan-out that both settings sustain: {first['conns']:,} sockets in "
        f"{first['groups']} groups of {first['conns'] // first['groups']}, "
        f"{fmt(first['target_deliveries_per_sec'])} deliveries/s "
        f"({fmt(first['target_deliveries_per_sec'] / (first['conns'] // first['groups']))} events/s) "
        f"for {first['secs']:g} s after a second of warm-up, 200-byte payloads; every server "
        "process on core 0 counts (the nodes and, on Redis, redis-server), the load generator on "
        "core 1; `--history on` and `off` take turns, a fresh server each run, one tokio worker per node "
        "either way (one core). Two nodes: each group's sockets are on one of them, half the groups on "
        "each, all published through the first, so half the events cross Redis."
    )
    out.append("")
    for nodes in sorted({r["nodes"] for r in found}):
        runs = [r for r in found if r["nodes"] == nodes]
        out.append(f"### {H1_SETUPS.get(nodes, f'{nodes} nodes')}\n")
        out.append(
            "| history | round | server CPU | CPU ms per 1,000 events | p50 (ms) | p99 (ms) | server RSS | delivered | with `_event_id` |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(runs, key=lambda r: (r["history"] != "on", r["round"])):
            out.append(
                f"| {r['history']} | {r['round']} | {r['cpu_percent']:.0f}% | "
                f"{r['cpu_ms_per_1000_events']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['rss_kib'] / 1024:.0f} MiB | {fmt(r['received'])} of {fmt(r['expected'])} | "
                f"{fmt(r['deliveries_with_event_id'])} |"
            )
        out.append("")
        out.append(
            "History on / off (medians over rounds): "
            f"server CPU {on_off_ratio(runs, 'cpu_percent')}, "
            f"CPU per 1,000 events {on_off_ratio(runs, 'cpu_ms_per_1000_events')}, "
            f"p50 {on_off_ratio(runs, 'p50_ms')}, p99 {on_off_ratio(runs, 'p99_ms')}, "
            f"server RSS {on_off_ratio(runs, 'rss_kib')}."
        )
        short = [r for r in runs if r["received"] != r["expected"]]
        if short:
            out.append("")
            out.append(
                "Not everything arrived in: "
                + ", ".join(f"history {r['history']} round {r['round']}" for r in short)
                + " (the rate was not sustained there)."
            )
        out.append("")


R1_STORES = {"memory": "one node, in memory", "redis": "Redis (published through one node, replayed on the other)"}


def replay_speed(rows, out):
    found = [r for r in rows if r.get("scenario") == "R1"]
    if not found:
        return
    first = found[0]
    out.append("## R1: replay speed to one socket\n")
    out.append(
        f"{first['events']:,} events (200 bytes) published to one group nobody listens to, then one "
        "socket subscribes and replays them all from a cursor taken before them (nodes run with "
        f"`--replay-limit {first['events']} --history-size {first['events']}`); timed from sending "
        f"`replay_events` to receiving `replay_events_result`, {first['replays']} replays one after "
        "another, on core 0 as above; a replay is incomplete unless it brings every event once, in "
        "id order, and nothing follows its result within 0.3 s. The last column is how fast the "
        "backlog went in, 500 events per `PublishBatch` call, one call at a time."
    )
    out.append("")
    out.append("| history store | replay, median (ms) | each replay (ms) | events/s | to the first event (ms) | retries | incomplete replays | publishing them, events/s |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in found:
        out.append(
            f"| {R1_STORES.get(r['store'], r['store'])} | {r['median_ms']:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in r['replay_ms'])} | {fmt(r['events_per_sec'])} | "
            f"{r['first_event_ms_median']:.1f} | {r['retries']} | {r['bad_replays']} | "
            f"{fmt(r['publish_batched_events_per_sec'])} |"
        )
    stores = {r["store"]: r for r in found}
    if "memory" in stores and "redis" in stores:
        out.append("")
        out.append(
            f"Redis / memory: {ratio(stores['redis']['median_ms'], stores['memory']['median_ms'])} replay time."
        )
    problems = [p for r in found for p in r.get("problems", [])]
    if problems:
        out.append("")
        out.append("Problems: " + "; ".join(problems) + ".")
    out.append("")


def replay_storm(rows, out):
    found = [r for r in rows if r.get("scenario") == "R2"]
    if not found:
        return
    first = found[0]
    per_group = first["sockets"] // first["groups"]
    out.append("## R2: replay storm after a node loss\n")
    out.append(
        f"Two nodes on Redis (defaults: `--replay-concurrency 64`, `--replay-limit 200`), all on core 0. "
        f"{first['sockets']:,} sockets on node A, each with its own `web_socket_id`, in "
        f"{first['groups']} groups of {per_group}, take a baseline (`last_seen_id: -1`); node A is "
        f"killed (SIGKILL); {first['events_per_group']} events per group are published through node B; "
        "then every socket reconnects to node B at once, subscribes again and replays with "
        "`supports_retry`, resending after `retry_after_ms` when told to. Per socket: from its first "
        "`replay_events` to its `replay_events_result`; served: from the request that was served."
    )
    out.append("")
    out.append("| p50 (ms) | p99 (ms) | max (ms) | wall time (s) | retries | sockets that retried | most retries of one | served p50 / p99 (ms) | server CPU | sockets without exactly their events |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in found:
        out.append(
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['wall_secs']:.2f} | "
            f"{fmt(r['retries'])} | {fmt(r['sockets_that_retried'])} | {r['max_retries_of_a_socket']} | "
            f"{r['served_p50_ms']:.1f} / {r['served_p99_ms']:.1f} | {fmt(r['cpu_percent'])}% | "
            f"{r['bad_sockets']} |"
        )
    out.append("")
    out.append(
        f"Every socket must get exactly its group's {first['events_per_group']} events before its "
        "result, once each and in id order, and a result naming the last of their ids; nothing more "
        "may come in the 0.3 s after it. The last column counts the sockets that did not (it must "
        "be 0). Wall time: from the first reconnect to the last result; server CPU: node B and "
        "redis-server over that time."
    )
    problems = [p for r in found for p in r.get("problems", [])]
    if problems:
        out.append("")
        out.append("First problems: " + "; ".join(problems) + ".")
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
        "read the ratios, not the absolute numbers. channelgate runs with its defaults, event",
        "history on, in S1..S5; H1 measures what history costs, R1 and R2 how replays go.",
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
    history_cost(rows, out)
    replay_speed(rows, out)
    replay_storm(rows, out)
    with open(target, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
