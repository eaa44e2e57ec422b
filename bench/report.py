#!/usr/bin/env python3
"""Turns the load generator's JSON lines into BENCHMARKS.md: one table per scenario and
the ratios of channelgate to each peer, with the machine and the date.

S1 and S3 lead with deliveries per server CPU-second (medians over rounds, with their
min-max spread), beside the highest sustained rate and latency at fixed rates. The sections
of the page this run did not make (other scripts' measurements, scenarios left out) are
kept where they were."""

import datetime
import json
import os
import platform
import sys

# The systems in the order their rows appear; a new peer needs a line here and in NAMES.
SYSTEMS = ["channelgate", "raw", "sockudo", "django"]
PEERS = [s for s in SYSTEMS if s != "channelgate"]
NAMES = {
    "channelgate": "channelgate",
    "raw": "raw broadcaster (tokio + tungstenite)",
    "sockudo": "sockudo 5.2.0 (Pusher protocol)",
    "django": "Django Channels 4 + channels_redis + daphne",
}
WORKERS = {1: "one tokio worker on core 0", 2: "two tokio workers on cores 0-1"}


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


def share(value):
    return "n/a" if value is None else f"{value * 100:.0f}%"


def ms(value):
    return "n/a" if value is None else f"{value:.2f}"


def median_of(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def median(runs, key):
    return median_of([r.get(key) or 0 for r in runs]) or 0


def spread(values, digits=0, unit=""):
    """min-max of the values, and their range as a share of the median."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    low, high, mid = min(values), max(values), median_of(values)
    number = (lambda v: f"{v:.{digits}f}") if digits else (lambda v: f"{v:,.0f}")
    if len(values) == 1:
        return f"{number(low)}{unit} (one run)"
    share = f" (±{(high - low) / 2 / mid * 100:.0f} %)" if mid else ""
    return f"{number(low)}{unit}–{number(high)}{unit}{share}"


def by_system(rows, scenario, workers=None):
    """Each system's rows of one scenario (and worker count), in the order they ran."""
    found = {}
    for r in rows:
        if r.get("scenario") != scenario:
            continue
        # Django is one process whatever the count: it belongs with one worker.
        if workers is not None and (r.get("workers") or 1) != workers:
            continue
        found.setdefault(r["system"], []).append(r)
    return found


def label(system, runs, i):
    round_ = runs[i].get("round")
    if len(runs) == 1:
        return NAMES[system]
    return f"{NAMES[system]}, round {round_ if round_ else i + 1}"


def ratio_lines(found, key, unit, out):
    """channelgate against each peer, on the medians over rounds."""
    if "channelgate" not in found:
        return
    rounds = len(found["channelgate"])
    over = " (medians over rounds)" if rounds > 1 else ""
    for peer in PEERS:
        if peer in found:
            out.append("")
            out.append(
                f"channelgate / {NAMES[peer]}: "
                f"{ratio(median(found['channelgate'], key), median(found[peer], key))} {unit}{over}"
            )


def rates_of(runs):
    rates = []
    for r in runs:
        for f in r.get("fixed") or []:
            if f["rate"] not in rates:
                rates.append(f["rate"])
    return rates


def at_rate(run, rate):
    for f in run.get("fixed") or []:
        if f["rate"] == rate:
            return f
    return None


def fixed_section(rows, scenario, title, workers, out, notes=()):
    """The per-CPU headline, the fixed rates and every round of one scenario at one worker
    count; Django (one process, no fixed rates) under it."""
    found = by_system(rows, scenario, workers)
    rust = {s: runs for s, runs in found.items() if s != "django" and any(r.get("fixed") for r in runs)}
    if not rust:
        return
    out.append(f"## {scenario}: {title}, {WORKERS.get(workers, f'{workers} tokio workers')}\n")
    any_run = next(iter(rust.values()))[0]
    rates = rates_of([r for runs in rust.values() for r in runs])
    rounds = max(len(runs) for runs in rust.values())
    out.append(
        f"Deliveries per server CPU-second over the fixed-rate steps together "
        f"({', '.join(fmt(r) for r in rates)} deliveries/s, {any_run.get('rate_secs', 0):g} s each, "
        f"the same schedule for every system), and the highest rate sustained after them; "
        f"{rounds} round{'s' if rounds > 1 else ''}, the systems taking turns."
    )
    for note in notes:
        out.append(note)
    out.append("")
    out.append("| system | deliveries per server CPU-second, median | min–max over rounds | of that CPU, in the kernel | highest sustained deliveries/s, median | min–max over rounds | server RSS |")
    out.append("|---|---|---|---|---|---|---|")
    for system in SYSTEMS:
        runs = rust.get(system)
        if not runs:
            continue
        per_cpu = [r.get("deliveries_per_cpu_sec") for r in runs]
        best = [r.get("deliveries_per_sec") for r in runs]
        out.append(
            f"| {NAMES[system]} | {fmt(median_of(per_cpu))} | {spread(per_cpu)} | "
            f"{share(median_of([r.get('kernel_share') for r in runs]))} | "
            f"{fmt(median_of(best))} | {spread(best)} | {median(runs, 'rss_kib') / 1024:.0f} MiB |"
        )
    peers = [p for p in PEERS if p in rust and "channelgate" in rust]
    for peer in peers:
        cg, other = rust["channelgate"], rust[peer]
        out.append("")
        out.append(
            f"channelgate / {NAMES[peer]} (medians over rounds): "
            f"{ratio(median(cg, 'deliveries_per_cpu_sec'), median(other, 'deliveries_per_cpu_sec'))} "
            f"deliveries per CPU-second (so {ratio(median(other, 'deliveries_per_cpu_sec'), median(cg, 'deliveries_per_cpu_sec'))} "
            f"the CPU per delivery), {ratio(median(cg, 'deliveries_per_sec'), median(other, 'deliveries_per_sec'))} "
            "highest sustained rate."
        )
    out.append("")
    out.append(f"### {scenario} at fixed rates\n")
    out.append("| system | deliveries/s | delivered / expected, all rounds | p50 (ms), median | p99 (ms), median | p99 min–max | server CPU, median | CPU min–max | in the kernel | deliveries per CPU-second, median | min–max |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for system in SYSTEMS:
        runs = rust.get(system)
        if not runs:
            continue
        for rate in rates:
            steps = [f for f in (at_rate(r, rate) for r in runs) if f]
            if not steps:
                continue
            expected = sum(f["expected"] for f in steps)
            received = sum(f["received"] for f in steps)
            p99 = [f["p99_ms"] for f in steps]
            cpu = [f["cpu_percent"] for f in steps]
            per_cpu = [f.get("deliveries_per_cpu_sec") for f in steps]
            out.append(
                f"| {NAMES[system]} | {fmt(rate)} | {fmt(received)} / {fmt(expected)} | "
                f"{ms(median_of([f['p50_ms'] for f in steps]))} | {ms(median_of(p99))} | {spread(p99, 2)} | "
                f"{fmt(median_of(cpu))}% | {spread(cpu, 0, '%')} | "
                f"{share(median_of([f['kernel_secs'] / f['cpu_secs'] if f.get('cpu_secs') and 'kernel_secs' in f else None for f in steps]))} | "
                f"{fmt(median_of(per_cpu))} | {spread(per_cpu)} |"
            )
    for peer in peers:
        parts = []
        for rate in rates:
            cg, other = (
                median_of([(at_rate(r, rate) or {}).get("deliveries_per_cpu_sec") for r in rust[s]])
                for s in ("channelgate", peer)
            )
            parts.append(f"{ratio(cg, other)} at {fmt(rate)}")
        out.append("")
        out.append(f"channelgate / {NAMES[peer]}, deliveries per CPU-second at each rate (medians): " + ", ".join(parts) + ".")
    out.append("")
    out.append(f"### {scenario}, each round\n")
    header = " / ".join(fmt(r) for r in rates)
    out.append(f"| system | round | deliveries per CPU-second | highest sustained | p99 at {header} (ms) | server CPU at {header} |")
    out.append("|---|---|---|---|---|---|")
    for system in SYSTEMS:
        for i, r in enumerate(rust.get(system, [])):
            p99 = " / ".join(ms((at_rate(r, rate) or {}).get("p99_ms")) for rate in rates)
            cpu = " / ".join(f"{(at_rate(r, rate) or {}).get('cpu_percent', 0):.0f}%" for rate in rates)
            best = fmt(r["deliveries_per_sec"]) if r.get("deliveries_per_sec") else (
                f"none (at {fmt(r.get('unsustained_rate'))}/s, {fmt(r.get('unsustained_received'))} of {fmt(r.get('unsustained_expected'))})"
            )
            out.append(
                f"| {NAMES[system]} | {r.get('round') or i + 1} | {fmt(r.get('deliveries_per_cpu_sec'))} | "
                f"{best} | {p99} | {cpu} |"
            )
    problems(found, out)
    django = found.get("django")
    if django:
        out.append("")
        out.append(
            f"{NAMES['django']} is one process (daphne, with a redis-server beside it on the same "
            "core) and runs once, without the fixed rates, which are far beyond it: its rate is "
            "searched from a few hundred deliveries a second, latency measured at half the best."
        )
        out.append("")
        out.append("| system | deliveries/s (best sustained) | deliveries per CPU-second at best | p50 at half (ms) | p99 at half (ms) | CPU at best | server RSS |")
        out.append("|---|---|---|---|---|---|---|")
        for r in django:
            if r.get("deliveries_per_sec"):
                best = fmt(r["deliveries_per_sec"])
                p50, p99 = ms(r.get("p50_ms_at_half")), ms(r.get("p99_ms_at_half"))
            else:
                best = (f"not sustained: at {fmt(r.get('unsustained_rate'))}/s, "
                        f"{fmt(r.get('unsustained_received'))} of {fmt(r.get('unsustained_expected'))} arrived")
                p50 = f"{ms(r.get('unsustained_p50_ms'))} (at that rate)"
                p99 = f"{ms(r.get('unsustained_p99_ms'))} (at that rate)"
            out.append(
                f"| {NAMES['django']} | {best} | {fmt(r.get('deliveries_per_cpu_sec_at_best'))} | {p50} | {p99} | "
                f"{fmt(r.get('cpu_percent_at_best'))}% | {r['rss_kib'] / 1024:.0f} MiB |"
            )
        if "channelgate" in rust:
            out.append("")
            out.append(
                f"channelgate (median) / {NAMES['django']}: "
                f"{ratio(median(rust['channelgate'], 'deliveries_per_sec'), median(django, 'deliveries_per_sec'))} "
                "highest sustained deliveries/s, "
                f"{ratio(median(rust['channelgate'], 'deliveries_per_cpu_sec_at_best'), median(django, 'deliveries_per_cpu_sec_at_best'))} "
                "deliveries per CPU-second, each at its highest sustained rate."
            )
    out.append("")


def problems(found, out):
    lost = [
        f"{label(s, runs, i)}: {r['lost_in_failed_step']}"
        for s, runs in found.items()
        for i, r in enumerate(runs)
        if r.get("lost_in_failed_step")
    ]
    if lost:
        out.append("")
        out.append("Undelivered in the search step that failed (the rate above the highest sustained): " + ", ".join(lost) + ".")
    short = [
        f"{label(s, runs, i)} at {fmt(f['rate'])}: {fmt(f['received'])} of {fmt(f['expected'])}"
        for s, runs in found.items()
        for i, r in enumerate(runs)
        for f in r.get("fixed") or []
        if f["received"] != f["expected"]
    ]
    if short:
        out.append("")
        out.append("Fixed-rate steps where not everything arrived: " + "; ".join(short) + ".")
    closed = [
        f"{label(s, runs, i)}: {r['slow_consumer_closes']}"
        for s, runs in found.items()
        for i, r in enumerate(runs)
        if r.get("slow_consumer_closes")
    ]
    out.append("")
    out.append("Sockets closed as slow consumers: " + (", ".join(closed) + "." if closed else "none."))


def cluster_section(rows, s1, out):
    found = [r for r in rows if r.get("scenario") == "S5"]
    if not found:
        return
    out.append("## S5: S1 across two channelgate nodes through Redis\n")
    out.append(
        "Two nodes (one worker each) and their redis-server, all on core 0, the load generator "
        "on core 1; the sockets alternate between the nodes, every event is published through "
        "the first, and every server process's CPU counts (both nodes and redis-server). "
        "The same fixed rates as S1, then the highest sustained rate."
    )
    out.append("")
    rates = rates_of(found)
    out.append("| round | deliveries per server CPU-second | highest sustained deliveries/s | " + " | ".join(f"p99 at {fmt(r)} (ms)" for r in rates) + " | server RSS |")
    out.append("|---|---|---|" + "---|" * len(rates) + "---|")
    for i, r in enumerate(found):
        out.append(
            f"| {r.get('round') or i + 1} | {fmt(r.get('deliveries_per_cpu_sec'))} | {fmt(r.get('deliveries_per_sec'))} | "
            + " | ".join(ms((at_rate(r, rate) or {}).get("p99_ms")) for rate in rates)
            + f" | {r['rss_kib'] / 1024:.0f} MiB |"
        )
    one = s1.get("channelgate", [])
    if one:
        out.append("")
        out.append(
            "Two nodes / one node (S5 / median of S1's channelgate rounds on one worker): "
            f"{ratio(median(found, 'deliveries_per_cpu_sec'), median(one, 'deliveries_per_cpu_sec'))} deliveries per CPU-second, "
            f"{ratio(median(found, 'deliveries_per_sec'), median(one, 'deliveries_per_sec'))} highest sustained rate."
        )
    problems({"channelgate": found}, out)
    out.append("")


REDIS_BUSES = {
    "S5-redis": ("redis", "one redis-server"),
    "S5-cluster": ("cluster", "Redis Cluster, 3 primaries + 3 replicas"),
}


def redis_servers(cpu):
    """A run's redis-servers in shard order: each primary (by port), then its replicas."""
    servers = cpu.get("servers") or []
    primaries = sorted((s for s in servers if s["role"] == "primary"), key=lambda s: s["port"])
    ordered, shard = [], {}
    for i, p in enumerate(primaries, 1):
        shard[p["port"]] = i
        ordered.append((f"shard {i} primary" if len(servers) > 1 else "the redis-server", p))
        for r in sorted((s for s in servers if s["role"] == f"replica of {p['port']}"), key=lambda s: s["port"]):
            ordered.append((f"shard {i} replica", r))
    for s in servers:
        if all(s is not o for _, o in ordered):
            ordered.append((s["role"], s))
    return ordered


def redis_cluster_section(rows, out):
    """S5 on one redis-server against S5 on a Redis Cluster, and how Redis CPU spreads."""
    found = {name: [r for r in rows if r.get("scenario") == scenario] for scenario, (name, _) in REDIS_BUSES.items()}
    if not any(found.values()):
        return
    labels = dict(REDIS_BUSES.values())
    cpu = {(r["bus"], r["round"]): r for r in rows if r.get("scenario") == "S5-redis-cpu"}
    out.append("## S5 on a Redis Cluster, against one Redis\n")
    out.append(
        "S5 (10,000 sockets in 100 groups of 100, alternating between two channelgate nodes of one "
        "tokio worker each, every event published through the first) on one redis-server "
        "(`--redis-url`) and on a local Redis Cluster of three primaries with one replica each "
        "(`--redis-cluster-nodes`, `scripts/redis-cluster.sh`: the groups spread over the shards "
        "with sharded pub/sub, history per lane). Everything server-side on core 0 as in S5 (both "
        "nodes and every redis-server, the cluster's six too, replicas included), the load "
        "generator on core 1: on two cores, pinning the six elsewhere would put them on the "
        "generator's core. The two take turns, the order swapped every round, each started "
        "afresh. Deliveries per server CPU-second count every server process: both nodes and "
        "every redis-server. The same fixed rates as S1, then the highest sustained rate (no "
        "loss, p99 within 100 ms)."
    )
    out.append("")
    rates = rates_of([r for runs in found.values() for r in runs])
    out.append(
        "| Redis | round | deliveries per server CPU-second | of that CPU, in the kernel | highest sustained deliveries/s | "
        + " | ".join(f"p99 at {fmt(r)} (ms)" for r in rates)
        + " | server RSS |"
    )
    out.append("|---|---|---|---|---|" + "---|" * len(rates) + "---|")
    for name, runs in found.items():
        for i, r in enumerate(runs):
            sustained = fmt(r.get("deliveries_per_sec"))
            if r.get("unsustained_rate"):
                sustained = f"none (not {fmt(r['unsustained_rate'])})"
            out.append(
                f"| {labels[name]} | {r.get('round') or i + 1} | {fmt(r.get('deliveries_per_cpu_sec'))} | "
                f"{share(r.get('kernel_share'))} | {sustained} | "
                + " | ".join(ms((at_rate(r, rate) or {}).get("p99_ms")) for rate in rates)
                + f" | {r.get('rss_kib', 0) / 1024:.0f} MiB |"
            )
    out.append("")
    for name, runs in found.items():
        if runs:
            out.append(
                f"{labels[name]}: {fmt(median(runs, 'deliveries_per_cpu_sec'))} deliveries per server CPU-second "
                f"(median; {spread([r.get('deliveries_per_cpu_sec') for r in runs])}), highest sustained "
                f"{fmt(median(runs, 'deliveries_per_sec'))} deliveries/s ({spread([r.get('deliveries_per_sec') for r in runs])})."
            )
            out.append("")
    if found["redis"] and found["cluster"]:
        out.append(
            "Cluster / one Redis (medians): "
            f"{ratio(median(found['cluster'], 'deliveries_per_cpu_sec'), median(found['redis'], 'deliveries_per_cpu_sec'))} deliveries per server CPU-second, "
            f"{ratio(median(found['cluster'], 'deliveries_per_sec'), median(found['redis'], 'deliveries_per_sec'))} highest sustained rate."
        )
        out.append("")
    notes = []
    for name, runs in found.items():
        for i, r in enumerate(runs):
            what = f"{labels[name]}, round {r.get('round') or i + 1}"
            if r.get("lost_in_failed_step"):
                notes.append(f"{what}: {fmt(r['lost_in_failed_step'])} undelivered in the search step that failed")
            for f in r.get("fixed") or []:
                if f["received"] != f["expected"]:
                    notes.append(f"{what}: {fmt(f['received'])} of {fmt(f['expected'])} at {fmt(f['rate'])}")
            if r.get("slow_consumer_closes"):
                notes.append(f"{what}: {r['slow_consumer_closes']} sockets closed as slow consumers")
    if notes:
        out.append("Not everything arrived: " + "; ".join(notes) + ".")
        out.append("")
    if not cpu:
        return
    out.append("### Redis CPU per redis-server\n")
    out.append(
        "Each redis-server's CPU seconds (utime + stime from /proc/PID/stat, in clock ticks over "
        "`getconf CLK_TCK`) from just before the load generator started to just after it ended: the "
        "10,000 subscribes, the fixed rates and the search, whose steps differ from run to run, so "
        "compare shares within a run more than seconds across runs. Roles from `redis-cli role` "
        "before the run (a change by its end is noted); primaries carry the pub/sub traffic and the "
        "history writes, replicas the replication stream. The nodes' CPU over the same time is "
        "beside it, with the lines at WARN or ERROR the nodes logged over the run (after their "
        "start-up warnings of `--dev`)."
    )
    out.append("")
    out.append("| Redis | round | redis-server | port | CPU s | share of the run's Redis CPU |")
    out.append("|---|---|---|---|---|---|")
    summary = []
    for (bus, round_), c in sorted(cpu.items(), key=lambda kv: (kv[0][0] != "redis", kv[0][1])):
        servers = redis_servers(c)
        total = sum(s["cpu_secs"] or 0 for _, s in servers)
        for what, s in servers:
            role = what if s["role"] == s["role_after"] else f"{what} ({s['role_after']} by the end)"
            secs = "gone" if s["cpu_secs"] is None else f"{s['cpu_secs']:.2f}"
            part = f"{(s['cpu_secs'] or 0) / total * 100:.0f}%" if total else "n/a"
            out.append(f"| {labels[bus]} | {round_} | {role} | {s['port']} | {secs} | {part} |")
        primaries = sum(s["cpu_secs"] or 0 for _, s in servers if s["role"] == "primary")
        nodes = c.get("node_cpu_secs") or []
        line = (
            f"{labels[bus]}, round {round_}: every redis-server {total:.2f} s"
            + (f" (primaries {primaries:.2f} s, replicas {total - primaries:.2f} s)" if len(servers) > 1 else "")
            + ", the nodes " + " and ".join("gone" if n is None else f"{n:.2f} s" for n in nodes)
            + f"; node log lines at WARN or ERROR: {c.get('node_log_warnings', 0)}."
        )
        summary.append(line)
    out.append("")
    for line in summary:
        out.append(line)
        out.append("")


IDEMPOTENCY_MD = "target/bench/idempotency.md"

INGEST_SETUPS = {
    "memory": "one node",
    "redis": "two nodes through Redis",
    "cluster": "two nodes through a Redis Cluster",
}


def ingest_bus(r):
    """memory, redis or cluster (rows from before the bus was labelled: by their nodes)."""
    return r.get("bus") or ("memory" if r["nodes"] == 1 else "redis")


def ingest_setup(r):
    return INGEST_SETUPS.get(ingest_bus(r), f"{r['nodes']} nodes")


def ingest_section(rows, out):
    every = [r for r in rows if r.get("scenario") == "S6"]
    found = [r for r in every if not r.get("keys")]
    if not found:
        return
    first = found[0]
    publish = next((r for r in found if r["mode"] == "publish"), first)
    batch = next((r for r in found if r["mode"] == "batch"), first)
    out.append("## S6: publish ingest, one subscriber in each of many groups\n")
    out.append(
        f"{first['groups']:,} groups (`table-N`) with one socket each; for {first['secs']:g} s a publisher keeps "
        f"{publish['in_flight']} Publish calls in flight (one event each, the groups round robin, "
        f"200-byte payloads stamped with their send time), then for {first['secs']:g} s "
        f"{batch['in_flight']} PublishBatch calls of {batch['batch']} events, all on one gRPC "
        "connection; each call is made again as soon as it is answered. Accepted: events of "
        "calls answered OK, per second of publishing; delivered: events the sockets got, per "
        "second up to the last of them; latency from the send stamp to the socket. One node: on "
        "core 0, the load generator on core 1. Two nodes: node A (published through) and "
        "redis-server on core 0, node B and the load generator on core 1 (there are only two "
        "cores: the generator shares node B's); the sockets alternate between the nodes, so "
        "half the events reach their socket on the other node through Redis (on a Redis "
        "Cluster, all six redis-servers on core 0 with node A). Server CPU counts "
        "every server process (the nodes and redis-server) and can pass 100 % with two nodes. "
        "Event history is on (the default), in memory on one node and in Redis streams on two. "
        "No event carries an idempotency key here; the runs with a key per event follow."
    )
    out.append("")
    out.append("| setup | calls | round | accepted events/s | delivered events/s | delivered / accepted | p50 (ms) | p99 (ms) | server CPU | events per server CPU-second | load generator CPU | failed calls |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    buses = list(INGEST_SETUPS)
    def key(r):
        bus = ingest_bus(r)
        return (buses.index(bus) if bus in buses else len(buses), r["mode"] != "publish", r.get("round", 0))
    for r in sorted(found, key=key):
        calls = (f"Publish, {r['in_flight']} in flight" if r["mode"] == "publish"
                 else f"PublishBatch of {r['batch']}, {r['in_flight']} in flight")
        setup = ingest_setup(r)
        out.append(
            f"| {setup} | {calls} | {r.get('round', 1)} | "
            f"{fmt(r['accepted_per_sec'])} | {fmt(r['delivered_per_sec'])} | {fmt(r['delivered'])} / {fmt(r['accepted'])} | "
            f"{ms(r['p50_ms'])} | {ms(r['p99_ms'])} | {r['server_cpu_percent']:.0f}% | {fmt(r.get('events_per_cpu_sec'))} | "
            f"{r['loadgen_cpu_percent']:.0f}% | {fmt(r['failed_calls'])} |"
        )
    out.append("")
    lines = []
    for bus in sorted({ingest_bus(r) for r in found}, key=lambda b: buses.index(b) if b in buses else len(buses)):
        for mode in ("publish", "batch"):
            runs = [r for r in found if ingest_bus(r) == bus and r["mode"] == mode]
            if runs:
                lines.append(
                    f"{INGEST_SETUPS.get(bus, bus)}, {'Publish' if mode == 'publish' else 'PublishBatch'}: "
                    f"{fmt(median(runs, 'accepted_per_sec'))} accepted/s"
                    + (f" ({spread([r['accepted_per_sec'] for r in runs])})" if len(runs) > 1 else "")
                    + ", "
                    f"{fmt(median(runs, 'delivered_per_sec'))} delivered/s, p99 {ms(median(runs, 'p99_ms'))} ms, "
                    f"{fmt(median(runs, 'events_per_cpu_sec'))} events per server CPU-second"
                )
    if lines:
        out.append("Medians over rounds: " + "; ".join(lines) + ".")
        out.append("")
    bad = [
        f"{ingest_setup(r)}{' with keys' if r.get('keys') else ''} {r['mode']} round {r.get('round')}: "
        + ", ".join(
            f"{k.replace('_', ' ')} {fmt(r[k])}"
            for k in ("missing", "duplicates", "wrong_socket", "slow_consumer_closes", "failed_calls", "unchecked")
            if r.get(k)
        )
        + (f" (first error: {r['first_error']})" if r.get("first_error") else "")
        for r in every
        if any(r.get(k) for k in ("missing", "duplicates", "wrong_socket", "slow_consumer_closes", "failed_calls"))
    ]
    ingest_keys_section(every, out)
    out.append(
        "Every accepted event must reach its group's socket once (missing: accepted, never "
        "delivered; duplicates; wrong socket: delivered to another group's socket), with a key "
        "or without: "
        + ("; ".join(bad) + "." if bad else "all did, in every run.")
    )
    out.append("")


def ingest_keys_section(found, out):
    """S6 without and with an idempotency key on every event, side by side."""
    if not any(r.get("keys") for r in found):
        return
    buses = list(INGEST_SETUPS)
    out.append("### S6 with an idempotency key on every event\n")
    out.append(
        "The same runs with a key of its own on every event (32 hex characters, as a client's "
        "uuid4 hex), taking turns with the runs without within each setup and round (the order "
        "swapped every round), each on servers started afresh. With a key, one node checks and "
        "records it in its map under one lock (at most `--idempotency-keys`, 100,000 by default: "
        "past it the oldest go first); on Redis the publish script GETs and SETs it (`PX` the "
        "window). Medians over rounds, with the min–max; key / no key is the ratio of the medians."
    )
    out.append("")
    out.append("| setup | calls | key | rounds | accepted events/s, median (min–max) | events per server CPU-second, median (min–max) | p99 (ms), median | key / no key, events/s | key / no key, per CPU-second |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for bus in sorted({ingest_bus(r) for r in found}, key=lambda b: buses.index(b) if b in buses else len(buses)):
        for mode in ("publish", "batch"):
            base = [r for r in found if ingest_bus(r) == bus and r["mode"] == mode and not r.get("keys")]
            keyed = [r for r in found if ingest_bus(r) == bus and r["mode"] == mode and r.get("keys")]
            for runs, label in ((base, "none"), (keyed, "one per event")):
                if not runs:
                    continue
                calls = (f"Publish, {runs[0]['in_flight']} in flight" if mode == "publish"
                         else f"PublishBatch of {runs[0]['batch']}, {runs[0]['in_flight']} in flight")
                ratio_rate = ratio_cpu = ""
                if label != "none" and base:
                    def r_(k):
                        b = median(base, k)
                        return f"{median(runs, k) / b:.2f}x" if b else "n/a"
                    ratio_rate, ratio_cpu = r_("accepted_per_sec"), r_("events_per_cpu_sec")
                out.append(
                    f"| {INGEST_SETUPS.get(bus, bus)} | {calls} | {label} | {len(runs)} | "
                    f"{fmt(median(runs, 'accepted_per_sec'))} ({spread([r['accepted_per_sec'] for r in runs])}) | "
                    f"{fmt(median(runs, 'events_per_cpu_sec'))} ({spread([r.get('events_per_cpu_sec') for r in runs])}) | "
                    f"{ms(median(runs, 'p99_ms'))} | {ratio_rate} | {ratio_cpu} |"
                )
    out.append("")
    out.append(
        "A ratio whose min–max ranges overlap is within this machine's run-to-run noise; "
        "`bash bench/idempotency.sh` counts instructions per publish with and without a key, "
        "which noise does not move, redis-server's time per publish script and the memory a "
        "key takes" + (
            "; its latest table, not from this run:" if os.path.exists(IDEMPOTENCY_MD) else "."
        )
    )
    out.append("")
    if os.path.exists(IDEMPOTENCY_MD):
        with open(IDEMPOTENCY_MD) as f:
            out.append(f.read().strip())
        out.append("")


def idle_section(rows, out):
    idle = [r for r in rows if r.get("scenario") == "S2"]
    if not idle:
        return
    out.append("## S2: idle authenticated connections with one page each\n")
    out.append("One worker (Django: one process); one round.\n")
    out.append("| system | connections | server RSS before | after | RSS per connection |")
    out.append("|---|---|---|---|---|")
    for system in SYSTEMS:
        for r in sorted((r for r in idle if r["system"] == system), key=lambda r: r["conns"]):
            out.append(
                f"| {NAMES[system]} | {r['conns']:,} | {r['rss_kib_before'] / 1024:.1f} MiB | "
                f"{r['rss_kib_after'] / 1024:.1f} MiB | {r['kib_per_conn']:.1f} KiB |"
            )
    per_conn = {(r["system"], r["conns"]): r["kib_per_conn"] for r in idle}
    for peer in PEERS:
        for conns in sorted({r["conns"] for r in idle}):
            cg, other = per_conn.get(("channelgate", conns)), per_conn.get((peer, conns))
            if cg and other:
                out.append("")
                out.append(f"channelgate / {NAMES[peer]} at {conns:,}: {ratio(cg, other)} RSS per connection")
    out.append("")


def storm_section(rows, out):
    storm = by_system(rows, "S4")
    if not storm:
        return
    out.append("## S4: connect storm, 10,000 connects and subscribes as fast as they go\n")
    out.append("The opening of S1's sockets, in each S1 run; the worker column is the server's.\n")
    out.append("| system | workers | round | handshakes/s | seconds to the last page_add | server CPU |")
    out.append("|---|---|---|---|---|---|")
    for system in SYSTEMS:
        runs = sorted(storm.get(system, []), key=lambda r: (r.get("workers") or 1, r.get("round") or 0))
        for i, r in enumerate(runs):
            workers = "one process" if system == "django" else (r.get("workers") or 1)
            out.append(
                f"| {NAMES[system]} | {workers} | {r.get('round') or 1} | {fmt(r['handshakes_per_sec'])} | "
                f"{r['seconds_to_last_page_add']:.2f} | {fmt(r['cpu_percent'])}% |"
            )
    one = {s: [r for r in runs if (r.get("workers") or 1) == 1] for s, runs in storm.items()}
    ratio_lines(one, "handshakes_per_sec", "handshakes/s on one worker", out)
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


# bench/callgrind.sh's last table; `make bench` does not run it (it takes minutes a variant).
CALLGRIND = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "bench", "callgrind.md")


def callgrind_section(out):
    try:
        with open(CALLGRIND) as f:
            table = f.read().strip()
    except OSError:
        return
    out.append("## Instructions and system calls per delivery (callgrind)\n")
    out.append(
        "From the last `bash bench/callgrind.sh` on this machine, not from this run: each server "
        "under valgrind's callgrind with one tokio worker, the same short S1-shaped run for each "
        "(100 sockets a group), the difference between two event counts divided by the extra "
        "deliveries. No neighbour moves these counts, so a change of a few per cent shows; they "
        "are user-space instructions only, the kernel's side of the system calls is not in them."
    )
    out.append("")
    out.append(table)
    out.append("")


def main():
    path, target = sys.argv[1], sys.argv[2]
    rows = load(path)
    out = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` on {datetime.date.today().isoformat()}, {machine()}. Every",
        "Rust server under test gets the same tokio worker count: one worker pinned to core 0 for",
        "the headline tables, the load generator (`bench/`, release build) on core 1; a second S1",
        "table gives each two workers on cores 0-1, which the generator on core 1 then shares.",
        "Django/daphne is one process either way. Every system gets the same sockets, pages and",
        "payloads (200 bytes, stamped with their send time), and is started afresh for each run.",
        "sockudo (a Rust package, built by `bench/peers/sockudo/setup.sh`) takes its worker count from",
        "`TOKIO_WORKER_THREADS` like the raw broadcaster; its sockets speak Pusher protocol 7 (a",
        "public channel per group) and events go in through Pusher's signed HTTP API, with its",
        "defaults but for the rate limiter and the metrics server, both off",
        "(`bench/peers/sockudo/README.md`).",
        "",
        "S1 and S3 hold a few fixed rates for the same time on every system and report, per rate,",
        "delivered/expected, p50/p99 and the server's CPU; the primary figure is deliveries per",
        "server CPU-second over those steps (deliveries over the CPU time the server process",
        "used, read from /proc), which a neighbour's burst on this shared machine moves far less",
        "than a rate, given with its min-max over rounds. Then the highest sustained rate (no",
        "loss, p99 within 100 ms; S3: one second) is searched from where the fixed rates left it:",
        "1.4x steps up or down, then two geometric halvings between the last rate that held and",
        "the first that failed. The Rust servers take turns, the order swapped every round;",
        "ratios are of the medians. Latencies are histogrammed up to one second: 1000 ms means a",
        "second or more. The load generator reads with its own framing (`bench/src/client.rs`) so",
        "that it is not what limits a table. channelgate runs with its defaults (event history",
        "on); H1 measures what history costs, R1 and R2 how replays go. `bash bench/callgrind.sh`",
        "counts instructions and system calls per delivery for channelgate and the raw",
        "broadcaster, which no noise moves (its latest table, where there is one, closes this",
        "page); its instructions are user space only, and the kernel's share of the server's CPU",
        "(the \"in the kernel\" columns, from /proc's stime) says how much that leaves out.",
        "",
    ]
    s1_title = "fan-out, 10,000 connections in 100 groups of 100"
    fixed_section(rows, "S1", s1_title, 1, out)
    for workers in sorted({r.get("workers") for r in rows if r.get("scenario") == "S1" and r.get("workers") not in (None, 1)}):
        fixed_section(rows, "S1", s1_title, workers, out, notes=(
            "The server may use both cores, and the load generator, on core 1, takes part of one: "
            "read it for how each system scales, not as the machine's limit.",))
    idle_section(rows, out)
    fixed_section(rows, "S3", "one hot group of 5,000", 1, out, notes=(
        "One event reaches 5,000 sockets one write at a time, so a step holds with a p99 up to one second.",))
    storm_section(rows, out)
    cluster_section(rows, by_system(rows, "S1", 1), out)
    redis_cluster_section(rows, out)
    ingest_section(rows, out)
    history_cost(rows, out)
    replay_speed(rows, out)
    replay_storm(rows, out)
    callgrind_section(out)
    try:
        with open(target) as f:
            out = keep_other_sections(f.read().split("\n"), out)
    except OSError:
        pass
    with open(target, "w") as f:
        f.write("\n".join(out).rstrip("\n") + "\n")


def sections(lines):
    """The page cut at its `##` and `###` headings: (key, lines), the first keyed None. A
    `###` is keyed with its `##`, as several sections have subsections of the same name."""
    cut, part = [(None, [])], None
    for line in lines:
        if line.startswith("## "):
            part = line.strip()
            cut.append((part, []))
        elif line.startswith("### "):
            cut.append((f"{part} / {line.strip()}", []))
        cut[-1][1].append(line)
    return cut


def keep_other_sections(old, new):
    """The new page with the sections of the old one that this run did not make: those other
    scripts measured (compression, the raw broadcaster's designs, ...) and the tables of
    scenarios this run left out. Each stays after the section it followed."""
    made = {heading for heading, _ in sections(new) if heading}
    kept, after = {}, None
    for heading, lines in sections(old):
        if heading is None or heading in made:
            after = heading or after
        else:
            kept.setdefault(after, []).extend(lines)
    page = []
    for heading, lines in sections(new):
        page += lines + kept.get(heading, [])
    return page


if __name__ == "__main__":
    main()
