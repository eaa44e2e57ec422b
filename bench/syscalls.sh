#!/usr/bin/env bash
# What a server does in the kernel's eyes during S1 at one fixed rate: its CPU time,
# context switches and system calls over 8 s of steady load, counted by `perf stat`
# (tracepoints, so counts no neighbour moves), beside the load generator's deliveries per
# server CPU-second and p99. The systems take turns, the order rotated every round, each
# started afresh; the server on core 0 with one tokio worker (cores 0-1 with two), the
# load generator on core 1.
#
#   bash bench/syscalls.sh   # ROUNDS=3 RATE=25000 WORKERS=1
#                            # SYSTEMS="raw channelgate" (raw: rawcast's default design;
#                            # NAME=path/to/a/channelgate runs that binary as NAME, e.g.
#                            # parent=../old/target/release/channelgate)
#
# Each run makes two fixed steps of 10 s at RATE; perf counts 8 s of the second. Results:
# bench/results/syscalls.jsonl (RESULTS); a table on standard output and in
# target/bench/syscalls.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
rounds=${ROUNDS:-3}
rate=${RATE:-25000}
workers=${WORKERS:-1}
read -ra systems <<<"${SYSTEMS:-raw channelgate}"
results=${RESULTS:-bench/results/syscalls.jsonl}
secret=bench-secret
events=task-clock,context-switches
for call in sendto writev recvfrom epoll_wait futex; do events+=",syscalls:sys_enter_$call"; done
mkdir -p bench/results target/bench
: >"$results"
ulimit -n 20000
cores=0
(( workers > 1 )) && cores=0-1
command -v perf >/dev/null || { echo "perf is missing (Debian: linux-perf)" >&2; exit 1; }

cargo build --release -q -p channelgate -p channelgate-bench
server_pid= loadgen_pid=
cleanup() {
  stop_pid "$loadgen_pid"; loadgen_pid=
  stop_pid "$server_pid"; server_pid=
}
trap cleanup EXIT

run() { # system round
  local label=$1 round=$2 ws_port grpc_port kind=channelgate bin=./target/release/channelgate
  local log=target/bench/syscalls-loadgen.log counts=target/bench/syscalls-perf.csv
  ws_port=$(free_port); grpc_port=$(free_port)
  [[ $label == *=* ]] && { bin=${label#*=}; label=${label%%=*}; }
  if [[ $label == raw ]]; then
    kind=raw
    start_rawcast "$cores" "$workers" "$ws_port"
  else
    start_channelgate "$bin" "$cores" "$workers" "$ws_port" "$grpc_port" "$secret"
  fi
  echo "== $label, round $round" >&2
  # A search that stops at its first step: only the two fixed steps matter here.
  timeout 300 taskset -c 1 ./target/release/loadgen --system "$kind" --jwt-secret "$secret" \
    --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" --server-pid "$server_pid" \
    fanout-search --scenario "S1-$label" --conns 10000 --groups 100 --rates "$rate,$rate" \
    --rate-secs 10 --start-rate "$rate" --max-p99-ms 0.001 --step-secs 1 --workers "$workers" \
    --round "$round" >target/bench/syscalls-loadgen.json 2>"$log" &
  loadgen_pid=$!
  # The first step's line comes when it ends; the second starts half a second later.
  until grep -q target "$log"; do
    kill -0 "$loadgen_pid" 2>/dev/null || { echo "the load generator ended early" >&2; cat "$log" >&2; exit 1; }
    sleep 0.2
  done
  sleep 1.5
  perf stat -x, -e "$events" -p "$server_pid" -- sleep 8 2>"$counts"
  wait "$loadgen_pid"; loadgen_pid=
  python3 - "$label" "$round" "$counts" target/bench/syscalls-loadgen.json >>"$results" <<'PY'
import json, sys
label, round_, counts, loadgen = sys.argv[1:]
row = {"system": label, "round": int(round_)}
for line in open(counts):
    fields = line.strip().split(",")
    if len(fields) > 2 and fields[0].replace(".", "").isdigit():
        row[fields[2].split(":")[-1].removeprefix("sys_enter_")] = float(fields[0])
run = [json.loads(l) for l in open(loadgen) if l.startswith("{")][-1]
second = run["fixed"][-1]
row |= {k: second[k] for k in ("deliveries_per_cpu_sec", "p99_ms", "received", "expected")}
print(json.dumps(row))
PY
  stop_pid "$server_pid"; server_pid=
}

n=${#systems[@]}
for round in $(seq "$rounds"); do
  for (( i = 0; i < n; i++ )); do run "${systems[(i + round - 1) % n]}" "$round"; done
done
python3 - "$results" "$rate" "$workers" <<'PY' | tee target/bench/syscalls.md
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"S1 at {int(sys.argv[2]):,} deliveries/s, {sys.argv[3]} worker(s); medians over rounds "
      "(min–max); perf's counts over 8 s of the second fixed step")
print()
cols = ["deliveries_per_cpu_sec", "p99_ms", "task-clock", "context-switches", "sendto", "writev",
        "recvfrom", "epoll_wait", "futex"]
print("| system | deliveries per server CPU-second | p99 (ms) | task-clock (ms) | context switches "
      "| sendto | writev | recvfrom | epoll_wait | futex | lost |")
print("|---" * 11 + "|")
by = {}
for r in rows:
    by.setdefault(r["system"], []).append(r)
for system, runs in by.items():
    cells = []
    for c in cols:
        xs = [r.get(c, 0) for r in runs]
        f = "{:,.1f}" if c == "p99_ms" else "{:,.0f}"
        cells.append(f"{f.format(statistics.median(xs))} ({f.format(min(xs))}–{f.format(max(xs))})")
    lost = sum(r["expected"] - r["received"] for r in runs)
    print(f"| {system} | " + " | ".join(cells) + f" | {lost:,} |")
PY
