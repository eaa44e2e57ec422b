"""Markdown tables from bench/compression.sh's JSON lines (bench/results/compression.jsonl):
bytes on the wire per delivery, S1 with clients that offer permessage-deflate, RSS per
connection. Medians over rounds with their min-max.

    compression_report.py RESULTS.jsonl [MORE.jsonl ...] > report.md
"""

import json
import statistics
import sys

SYSTEMS = [
    ("channelgate-off", "channelgate `--compression off`"),
    ("channelgate-shared", "channelgate `--compression shared`"),
    ("channelgate-auto", "channelgate `--compression auto` (default)"),
    ("channelgate-auto-level6", "channelgate auto, `--compression-level 6`"),
    ("channelgate-auto15", "channelgate auto, `--compression-window-bits 15`"),
    ("channelgate-auto-nohistory", "channelgate auto, `--history off`"),
    ("uvicorn-ids", "Baserow's stack with replay: Channels + uvicorn + websockets, `_event_id` in each payload"),
    ("uvicorn", "Baserow's stack as recorded: Channels + uvicorn + websockets, no event ids"),
    ("daphne", "Channels + daphne (no compression)"),
]
# What each channelgate system is compared with: Baserow's stack with the same payloads
# (event ids in each, or none).
BASELINE = {"channelgate-auto-nohistory": "uvicorn"}
NAMES = dict(SYSTEMS)
CASES = [
    ("session-1", 1, "session once (23 events, 3 sockets)"),
    ("session-20", 1, "session x20, other ids (460 events, 3 sockets)"),
    ("rows", 1, "rows_updated, 20 fields, 1 watcher"),
    ("rows", 4, "rows_updated, 20 fields, 4 watchers"),
    ("rows", 16, "rows_updated, 20 fields, 16 watchers"),
]


def spread(values, fmt="{:,.1f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a", "n/a"
    med = statistics.median(values)
    lo, hi = min(values), max(values)
    pct = (hi - lo) / 2 / med * 100 if med else 0
    return fmt.format(med), f"{fmt.format(lo)}–{fmt.format(hi)} (±{pct:.0f} %)"


def main():
    rows = [json.loads(line) for path in sys.argv[1:] for line in open(path) if line.startswith("{")]
    # A memory run that did not get every event is left out when another run of the same
    # system got them all.
    complete = {(r["label"]) for r in rows if r.get("scenario") == "memory" and r["delivered"] == r["expected"]}
    rows = [r for r in rows if not (r.get("scenario") == "memory" and r["delivered"] != r["expected"]
                                    and r["label"] in complete)]
    wire = [r for r in rows if r.get("scenario") == "wire"]
    if wire:
        print("### Bytes on the wire per delivery\n")
        print("What each subscriber's TCP socket read after the handshake (frame headers "
              "included), over the deliveries; median over rounds, min–max; every payload "
              "inflated by the client and checked against what was published.\n")
        header = "| system | " + " | ".join(c[2] for c in CASES) + " |"
        print(header)
        print("|---" * (len(CASES) + 1) + "|")
        plain = {}
        for key, name in SYSTEMS:
            cells = []
            present = False
            for stream, watchers, _ in CASES:
                got = [r for r in wire if r["label"] == key and r["stream"] == stream and r["watchers"] == watchers]
                if got:
                    present = True
                    plain[(stream, watchers)] = got[0]["published_payload_bytes_per_delivery"]
                bad = sum(r["mismatched"] for r in got)
                med, rng = spread([r["wire_bytes_per_delivery"] for r in got])
                cells.append(f"{med} ({rng.split(' (')[0]})" + (f" **{bad} mismatched**" if bad else ""))
            if present:
                print(f"| {name} | " + " | ".join(cells) + " |")
        print("| published payload, bytes per event | " + " | ".join(
            f"{plain.get((s, w), 0):,.1f}" for s, w, _ in CASES) + " |")
        print()
        def median(label, stream, watchers):
            got = [r["wire_bytes_per_delivery"] for r in wire if r["label"] == label
                   and r["stream"] == stream and r["watchers"] == watchers]
            return statistics.median(got) if got else None

        print("Against Baserow's stack with the same payloads (medians; channelgate with "
              "history, its default, against Baserow's with replay, whose backend appends "
              "`_event_id` to each payload; `--history off` against the session as "
              "recorded, without ids):\n")
        print("| system | against | " + " | ".join(c[2] for c in CASES) + " |")
        print("|---" * (len(CASES) + 2) + "|")
        for key, name in SYSTEMS:
            if not key.startswith("channelgate"):
                continue
            baseline = BASELINE.get(key, "uvicorn-ids")
            cells = []
            for stream, watchers, _ in CASES:
                got, b = median(key, stream, watchers), median(baseline, stream, watchers)
                cells.append(f"{got / b:.3f}x" if got and b else "n/a")
            if any(c != "n/a" for c in cells):
                print(f"| {name} | `{baseline}` | " + " | ".join(cells) + " |")
        print()
        ext = {}
        for r in wire:
            ext.setdefault(r["label"], r.get("extensions"))
        print("Answers to the offer: " + "; ".join(
            f"{NAMES.get(k, k)}: `{v}`" if v else f"{NAMES.get(k, k)}: none" for k, v in ext.items()) + ".\n")

    s1 = [r for r in rows if str(r.get("scenario", "")).startswith("S1-deflate")]
    if s1:
        print("### S1 with clients that offer permessage-deflate\n")
        modes = ["off", "shared", "auto"]
        print("| channelgate | deliveries per server CPU-second, median | min–max over rounds | "
              "of that CPU, in the kernel | highest sustained deliveries/s, median | min–max | "
              "p99 at it (ms), median | server CPU at it | server RSS |")
        print("|---|---|---|---|---|---|---|---|---|")
        medians = {}
        for mode in modes:
            got = [r for r in s1 if r["scenario"] == f"S1-deflate-{mode}"]
            if not got:
                continue
            med, rng = spread([r.get("deliveries_per_cpu_sec") for r in got], "{:,.0f}")
            medians[mode] = statistics.median([r["deliveries_per_cpu_sec"] for r in got if r.get("deliveries_per_cpu_sec")])
            kernel = statistics.median([r.get("kernel_share") or 0 for r in got])
            smed, srng = spread([r.get("sustained_rate") or 0 for r in got], "{:,.0f}")
            rss = statistics.median([r.get("rss_kib") or 0 for r in got]) / 1024
            p99b = statistics.median([r.get("p99_ms_at_best") or 0 for r in got])
            cpub = statistics.median([r.get("cpu_percent_at_best") or 0 for r in got])
            print(f"| `--compression {mode}` | {med} | {rng} | {kernel * 100:.0f}% | {smed} | {srng} | "
                  f"{p99b:.2f} | {cpub:.0f}% | {rss:.0f} MiB |")
        print()
        if "off" in medians:
            for mode in ("shared", "auto"):
                if mode in medians:
                    print(f"CPU per delivery, {mode} / off (medians): {medians['off'] / medians[mode]:.2f}x.\n")
        rates = sorted({f["rate"] for r in s1 for f in r.get("fixed", [])})
        print("| channelgate | deliveries/s | delivered / expected, all rounds | p50 (ms), median | "
              "p99 (ms), median | p99 min–max | server CPU, median | deliveries per CPU-second, median | min–max |")
        print("|---|---|---|---|---|---|---|---|---|")
        for mode in modes:
            got = [r for r in s1 if r["scenario"] == f"S1-deflate-{mode}"]
            for rate in rates:
                steps = [f for r in got for f in r.get("fixed", []) if f["rate"] == rate]
                if not steps:
                    continue
                exp = sum(f["expected"] for f in steps)
                rec = sum(f["received"] for f in steps)
                p50 = statistics.median(f["p50_ms"] for f in steps)
                p99, p99r = spread([f["p99_ms"] for f in steps], "{:,.2f}")
                cpu = statistics.median(f["cpu_percent"] for f in steps)
                dpc, dpcr = spread([f.get("deliveries_per_cpu_sec") for f in steps], "{:,.0f}")
                print(f"| `{mode}` | {rate:,.0f} | {rec:,} / {exp:,} | {p50:.2f} | {p99} | {p99r} | {cpu:.0f}% | {dpc} | {dpcr} |")
        print()
        print("| channelgate | round | deliveries per CPU-second | highest sustained | p99 at each fixed rate (ms) |")
        print("|---|---|---|---|---|")
        for mode in modes:
            for r in sorted((r for r in s1 if r["scenario"] == f"S1-deflate-{mode}"), key=lambda r: r.get("round") or 0):
                p99s = " / ".join(f"{f['p99_ms']:.2f}" for f in r.get("fixed", []))
                print(f"| `{mode}` | {r.get('round')} | {r.get('deliveries_per_cpu_sec') or 0:,.0f} | "
                      f"{r.get('sustained_rate') or 0:,.0f} | {p99s} |")
        closes = sum(r.get("slow_consumer_closes") or 0 for r in s1)
        print(f"\nSockets closed as slow consumers: {closes or 'none'}.\n")

    mem = [r for r in rows if r.get("scenario") == "memory"]
    if mem:
        print("### RSS per connection\n")
        print("| system | round | connections | RSS before | idle | after 3 events each | 12 s later | "
              "KiB per idle connection | KiB per connection, busy | busy − idle, KiB per connection | 12 s later, KiB per connection | delivered |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for key, name in SYSTEMS:
            for r in sorted((r for r in mem if r["label"] == key), key=lambda r: r["round"]):
                mib = lambda k: f"{r[k] / 1024:.1f} MiB"
                print(f"| {name} | {r['round']} | {r['conns']:,} | {mib('rss_kib_before')} | {mib('rss_kib_idle')} | "
                      f"{mib('rss_kib_busy')} | {mib('rss_kib_after_idle')} | {r['kib_per_conn_idle']:.2f} | "
                      f"{r['kib_per_conn_busy']:.2f} | {r['busy_minus_idle_kib_per_conn']:.2f} | "
                      f"{r['kib_per_conn_after_idle']:.2f} | {r['delivered']:,} / {r['expected']:,} |")
        print()


if __name__ == "__main__":
    main()
