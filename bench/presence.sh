#!/usr/bin/env bash
# P1, presence in one space of SOCKETS members (default 1,000; issue 12), side by side:
#   off: one node, presence off (the join storm only, timed to the last page_add);
#   one: one node, presence on;
#   two: two nodes on one redis-server, presence on, the sockets split between them.
# Each run: a join storm timed to the last presence.members, then SENDERS members (default
# 10) send FOCUS_RATE focus frames a second each (default 5, under the node's 10) for
# FOCUS_SECS (default 10), timed by every other member (`loadgen presence --help`).
#
# Every server process (each channelgate with --workers 1, and the redis-server) runs on
# core 0, the load generator on core 1; every system is started afresh on free ports for
# each run, and the three take turns for ROUNDS rounds (default 3), in a rotating order.
# Results: bench/results/presence.jsonl and target/bench/presence.md (RESULTS and REPORT
# override them); the table of medians and spreads is printed too. About two minutes after
# the build.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
rounds=${ROUNDS:-3}
sockets=${SOCKETS:-1000}
senders=${SENDERS:-10}
focus_rate=${FOCUS_RATE:-5}
focus_secs=${FOCUS_SECS:-10}
results=${RESULTS:-bench/results/presence.jsonl}
report=${REPORT:-target/bench/presence.md}
mkdir -p bench/results target/bench
: >"$results"
ulimit -n 20000

echo "building release binaries"
cargo build --release -q -p channelgate -p channelgate-bench

secret=bench-secret
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=(); }
trap cleanup EXIT

# What every node gets: one worker on core 0, room for every member and a margin.
node=(taskset -c 0 ./target/release/channelgate --dev --jwt-secret "$secret" --workers 1
  --presence-max-members $((sockets + 100)))

# One node with --presence $1; sets ws_addrs and server_pids.
start_one() {
  local ws_port grpc_port; ws_port=$(free_port); grpc_port=$(free_port)
  "${node[@]}" --presence "$1" --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
    >target/bench/presence-node.log 2>&1 &
  server_pids=($!); pids+=($!)
  wait_port "$ws_port" 10; wait_port "$grpc_port" 10
  ws_addrs=127.0.0.1:$ws_port
}

# A redis-server and two nodes with presence on, all on core 0; sets ws_addrs and
# server_pids (both nodes and redis-server, whose CPU counts as the server's).
start_two() {
  local redis_port ws_ports grpc_ports n
  redis_port=$(free_port)
  ws_ports=("$(free_port)" "$(free_port)"); grpc_ports=("$(free_port)" "$(free_port)")
  taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  server_pids=($!); pids+=($!)
  wait_port "$redis_port" 10
  for n in 0 1; do
    "${node[@]}" --presence on --redis-url "redis://127.0.0.1:$redis_port/" --node-id "node-$n" \
      --ws-addr "127.0.0.1:${ws_ports[n]}" --grpc-addr "127.0.0.1:${grpc_ports[n]}" \
      >"target/bench/presence-node-$n.log" 2>&1 &
    server_pids+=($!); pids+=($!)
  done
  for n in 0 1; do wait_port "${ws_ports[n]}" 10; wait_port "${grpc_ports[n]}" 10; done
  ws_addrs=127.0.0.1:${ws_ports[0]},127.0.0.1:${ws_ports[1]}
}

# The load generator on core 1, stopped after two minutes whatever happens.
loadgen() { # round, more presence flags...
  local round=$1 pid_flags=() pid; shift
  for pid in "${server_pids[@]}"; do pid_flags+=(--server-pid "$pid"); done
  timeout 120 taskset -c 1 ./target/release/loadgen --jwt-secret "$secret" --ws-addr "$ws_addrs" \
    "${pid_flags[@]}" presence --sockets "$sockets" --senders "$senders" --rate "$focus_rate" \
    --secs "$focus_secs" --round "$round" "$@" | tee -a "$results"
}

setups=(off one two)
for round in $(seq "$rounds"); do
  for i in 0 1 2; do
    setup=${setups[(i + round - 1) % 3]}
    case $setup in
      off) echo "== P1 round $round: one node, presence off (joins only)"
        start_one off; loadgen "$round" --expect-presence false || true ;;
      one) echo "== P1 round $round: one node, presence on"
        start_one on; loadgen "$round" || true ;;
      two) echo "== P1 round $round: two nodes on Redis, presence on"
        start_two; loadgen "$round" || true ;;
    esac
    cleanup
  done
done

python3 bench/presence_report.py "$results" "$report"
echo "wrote $report"
