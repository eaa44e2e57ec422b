#!/usr/bin/env bash
# make bench: channelgate, the raw broadcaster (the machine's practical limit) and Django
# Channels (the system channelgate replaces), driven by one load generator with the same
# scenarios in one run; results in bench/results/latest.jsonl and BENCHMARKS.md.
#
# The server under test runs on core 0 and the load generator on core 1, so they do not
# fight for a core. Each system is started afresh for each scenario. SYSTEMS, ROUNDS and
# STEP_SECS narrow or widen a run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
systems=${SYSTEMS:-"channelgate raw django"}
step_secs=${STEP_SECS:-2}
rounds=${ROUNDS:-3}
results=bench/results/latest.jsonl
mkdir -p bench/results target/bench
: >"$results"
ulimit -n 20000

echo "building release binaries"
cargo build --release -q -p channelgate -p channelgate-bench
if [[ " $systems " == *" django "* ]]; then
  bash bench/peers/django/setup.sh
fi

secret=bench-secret
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=(); }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

server_pid=
# Starts one system on core 0 on fresh ports (reusing ports would meet the last run's
# TIME_WAIT sockets); sets ws_port, grpc_port and server_pid (whose CPU and RSS count).
start_system() {
  ws_port=$(free_port)
  grpc_port=$(free_port)
  case $1 in
    channelgate)
      taskset -c 0 ./target/release/channelgate --dev --jwt-secret "$secret" \
        --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
        >target/bench/channelgate.log 2>&1 &
      server_pid=$!; pids+=("$server_pid") ;;
    raw)
      taskset -c 0 ./target/release/rawcast "127.0.0.1:$ws_port" >target/bench/raw.log 2>&1 &
      server_pid=$!; pids+=("$server_pid") ;;
    django)
      redis_port=$(free_port)
      taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
      pids+=($!)
      wait_port "$redis_port"
      export REDIS_URL="redis://127.0.0.1:$redis_port/0" JWT_SECRET="$secret"
      taskset -c 0 bash bench/peers/django/run.sh "$ws_port" >target/bench/django.log 2>&1 &
      server_pid=$!; pids+=("$server_pid") ;;
  esac
  wait_port "$ws_port"
}

loadgen() { # system, scenario args...
  local system=$1; shift
  taskset -c 1 ./target/release/loadgen --system "$system" --jwt-secret "$secret" \
    --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
    --server-pid "$server_pid" \
    --django-publisher "$root/bench/.venv-django/bin/python $root/bench/peers/django/publisher.py" \
    "$@" | tee -a "$results"
}

# The first step's deliveries/s: system, Rust systems' rate, Django's (default 200).
start_rate() { case $1 in django) echo "${3:-200}" ;; *) echo "$2" ;; esac; }

# Memory per idle connection barely moves between runs: one round.
for system in $systems; do
  echo "== $system: S2"
  start_system "$system"
  loadgen "$system" idle --conns 10000,19000 || true
  cleanup
done

# Throughput does move on a shared machine (a neighbour's burst can halve a run): the Rust
# systems take turns for $rounds rounds, and the report gives every round and the ratios of
# their medians. Django, far behind, runs once.
for round in $(seq "$rounds"); do
  for system in $systems; do
    if [[ $system == django && $round -gt 1 ]]; then continue; fi
    echo "== $system: S1, S4 and S3, round $round"
    start_system "$system"
    # S1's 10,000 sockets open as fast as they go: that opening is S4's connect storm.
    loadgen "$system" fanout-search --scenario S1 --storm-scenario S4 --conns 10000 --groups 100 \
      --start-rate "$(start_rate "$system" 40000)" --step-secs "$step_secs" || true
    cleanup
    start_system "$system"
    # One event reaches 5,000 sockets one write at a time, so its last delivery comes a
    # fan-out later; S3 therefore runs until loss or a p99 over one second, not 100 ms.
    loadgen "$system" fanout-search --scenario S3 --conns 5000 --groups 1 --max-p99-ms 1000 \
      --start-rate "$(start_rate "$system" 400000 5000)" --step-secs "$step_secs" || true
    cleanup
  done
done

if [[ " $systems " == *" channelgate "* ]]; then
  echo "== channelgate, two nodes through Redis (S5)"
  ws_ports=("$(free_port)" "$(free_port)")
  grpc_ports=("$(free_port)" "$(free_port)")
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  pids+=($!)
  wait_port "$redis_port"
  for n in 0 1; do
    taskset -c 0 ./target/release/channelgate --dev --jwt-secret "$secret" --node-id "node-$n" \
      --redis-url "redis://127.0.0.1:$redis_port/" \
      --ws-addr "127.0.0.1:${ws_ports[n]}" --grpc-addr "127.0.0.1:${grpc_ports[n]}" \
      >"target/bench/node-$n.log" 2>&1 &
    pids+=($!)
  done
  wait_port "${ws_ports[0]}"; wait_port "${ws_ports[1]}"
  server_pid=${pids[-2]}
  taskset -c 1 ./target/release/loadgen --system channelgate --jwt-secret "$secret" \
    --ws-addr "127.0.0.1:${ws_ports[0]},127.0.0.1:${ws_ports[1]}" --grpc-addr "127.0.0.1:${grpc_ports[0]}" \
    --server-pid "${pids[-2]}" --server-pid "${pids[-1]}" \
    fanout-search --scenario S5 --conns 10000 --groups 100 --start-rate 40000 --step-secs "$step_secs" \
    | tee -a "$results" || true
  cleanup
fi

python3 bench/report.py "$results" BENCHMARKS.md
echo "wrote BENCHMARKS.md"
