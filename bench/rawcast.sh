#!/usr/bin/env bash
# The raw broadcaster's designs side by side, and channelgate beside them: S1 (10,000
# sockets in 100 groups, 200-byte events) at fixed rates on WORKERS tokio workers, the
# systems taking turns, the order rotated every round, each started afresh; deliveries per
# server CPU-second over the fixed rates is the figure (rawcast's header says what each
# design is). The load generator on core 1; the server on core 0 with one worker, on
# cores 0-1 with two.
#
#   bash bench/rawcast.sh   # ROUNDS=2 WORKERS=1 RATES=40000,65000,80000 RATE_SECS=4
#                           # DESIGNS="select-16k-1024 tasks-128k-256 select-128k-256 tasks-16k-1024"
#                           # CHANNELGATE=1 (0 leaves it out)
#                           # GATEWAYS="channelgate+ping-interval-ms=3600000 ..." (more
#                           # channelgate runs beside its defaults, each `+name=value`
#                           # given as `--name value`)
#                           # BASE=path/to/an/older/channelgate (runs it beside, with its
#                           # defaults, as `channelgate@base`: a change against its parent)
#
# Results: bench/results/rawcast.jsonl (RESULTS); two tables (over the fixed rates, then
# each rate) on standard output and in target/bench/rawcast.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
rounds=${ROUNDS:-2}
workers=${WORKERS:-1}
rates=${RATES:-40000,65000,80000}
rate_secs=${RATE_SECS:-4}
designs=${DESIGNS:-"select-16k-1024 tasks-128k-256 select-128k-256 tasks-16k-1024"}
with_channelgate=${CHANNELGATE:-1}
results=${RESULTS:-bench/results/rawcast.jsonl}
secret=bench-secret
mkdir -p bench/results target/bench
: >"$results"
ulimit -n 20000
cores=0
(( workers > 1 )) && cores=0-1

cargo build --release -q -p channelgate -p channelgate-bench
server_pid=
cleanup() { [[ -z $server_pid ]] || { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; server_pid=; }; }
trap cleanup EXIT

# A design's name: DESIGN-BUFFERk-BATCH, e.g. tasks-128k-256.
run() { # label round
  local label=$1 round=$2 ws_port grpc_port system
  ws_port=$(free_port); grpc_port=$(free_port)
  if [[ $label == channelgate* ]]; then
    system=channelgate
    local extra=() part parts bin=./target/release/channelgate
    [[ $label == channelgate@base ]] && bin=$BASE
    IFS=+ read -ra parts <<<"${label#channelgate}"
    for part in "${parts[@]}"; do [[ -n $part && $part != @base ]] && extra+=("--${part%%=*}" "${part#*=}"); done
    start_channelgate "$bin" "$cores" "$workers" "$ws_port" "$grpc_port" "$secret" "${extra[@]}"
  else
    system=raw
    local design buffer batch
    IFS=- read -r design buffer batch <<<"$label"
    start_rawcast "$cores" "$workers" "$ws_port" \
      --design "$design" --write-buffer $(( ${buffer%k} * 1024 )) --batch "$batch"
  fi
  echo "== $label, round $round" >&2
  timeout 300 taskset -c 1 ./target/release/loadgen --system "$system" --jwt-secret "$secret" \
    --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" --server-pid "$server_pid" \
    fanout-search --scenario "S1-$label" --conns 10000 --groups 100 --rates "$rates" \
    --rate-secs "$rate_secs" --start-rate 40000 --step-secs 2 --workers "$workers" --round "$round" \
    | tee -a "$results" >/dev/null || true
  cleanup
}

labels=($designs)
(( with_channelgate )) && labels+=(channelgate)
labels+=(${GATEWAYS:-})
[[ -z ${BASE:-} ]] || labels+=(channelgate@base)
n=${#labels[@]}
for round in $(seq "$rounds"); do
  for (( i = 0; i < n; i++ )); do run "${labels[(i + round - 1) % n]}" "$round"; done
done
python3 - "$results" <<'PY' | tee target/bench/rawcast.md
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {}
for r in rows:
    by.setdefault(r["scenario"].removeprefix("S1-"), []).append(r)
rates = sorted({s["rate"] for r in rows for s in r.get("fixed", [])})
print("| system | deliveries per server CPU-second, median | min–max | kernel share | "
      + " | ".join(f"p99 at {int(x):,} (ms), min–max" for x in rates)
      + " | highest sustained, min–max |")
print("|---" * (5 + len(rates)) + "|")
for label, runs in by.items():
    per = [r["deliveries_per_cpu_sec"] for r in runs if r.get("deliveries_per_cpu_sec")]
    cells = []
    for x in rates:
        p99 = [s["p99_ms"] for r in runs for s in r["fixed"] if s["rate"] == x and s["received"] == s["expected"]]
        lost = sum(s["expected"] - s["received"] for r in runs for s in r["fixed"] if s["rate"] == x)
        cells.append((f"{min(p99):.1f}–{max(p99):.1f}" if p99 else "n/a") + (f" ({lost:,} lost)" if lost else ""))
    best = [r.get("sustained_rate") for r in runs if r.get("sustained_rate")]
    kernel = statistics.median([r["kernel_share"] for r in runs if r.get("kernel_share") is not None] or [0])
    print(f"| {label} | {statistics.median(per):,.0f} | {min(per):,.0f}–{max(per):,.0f} | {kernel:.0%} | "
          + " | ".join(cells) + f" | {min(best):,.0f}–{max(best):,.0f} |" if per and best else f"| {label} | n/a |")
# Per rate, as the issue's table has it: each system's medians with min–max over rounds.
def spread(xs, f):
    return f"{f.format(statistics.median(xs))} ({f.format(min(xs))}–{f.format(max(xs))})" if xs else "n/a"
print()
print("| S1 rate | system | deliveries per server CPU-second | p99 (ms) | server CPU |")
print("|---|---|---|---|---|")
for x in rates:
    for label, runs in by.items():
        steps = [s for r in runs for s in r.get("fixed", []) if s["rate"] == x]
        print(f"| {int(x):,} | {label} | {spread([s['deliveries_per_cpu_sec'] for s in steps], '{:,.0f}')} | "
              f"{spread([s['p99_ms'] for s in steps], '{:.1f}')} | {spread([s['cpu_percent'] for s in steps], '{:.0f} %')} |")
PY
