#!/usr/bin/env bash
# make bench: channelgate, the raw broadcaster (the machine's practical limit) and Django
# Channels (the system channelgate replaces), driven by one load generator with the same
# scenarios in one run; results in bench/results/latest.jsonl and BENCHMARKS.md.
#
# The server under test runs on core 0 and the load generator on core 1, so they do not
# fight for a core. Each system is started afresh for each scenario. SYSTEMS, ROUNDS and
# STEP_SECS narrow or widen a run.
#
# The history scenarios (channelgate only): H1, publish cost with history on against off
# (H1_ROUNDS rounds taking turns, H1_RATE deliveries/s for H1_SECS, H1_CONNS sockets in
# groups of 100), R1, one socket replaying R1_EVENTS events, and R2, a replay storm of
# R2_SOCKETS sockets after a node is killed. ONLY=history runs just those, ONLY=classic
# just S1..S5; a run with ONLY set writes bench/results/$ONLY.jsonl and
# target/bench/BENCHMARKS-$ONLY.md, not BENCHMARKS.md (RESULTS and REPORT override both).
# ONLY=presence runs bench/presence.sh (P1, presence in one space of 1,000 members) instead,
# into bench/results/presence.jsonl and target/bench/presence.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${ONLY:-} == presence ]]; then exec bash bench/presence.sh; fi
root=$(pwd)
systems=${SYSTEMS:-"channelgate raw django"}
step_secs=${STEP_SECS:-2}
rounds=${ROUNDS:-3}
only=${ONLY:-}
h1_rounds=${H1_ROUNDS:-3}
h1_rate=${H1_RATE:-30000}
h1_secs=${H1_SECS:-4}
h1_conns=${H1_CONNS:-10000}
r1_events=${R1_EVENTS:-10000}
r2_sockets=${R2_SOCKETS:-1000}
case $only in
  "") results=${RESULTS:-bench/results/latest.jsonl}; report=${REPORT:-BENCHMARKS.md} ;;
  history|classic)
    results=${RESULTS:-bench/results/$only.jsonl}; report=${REPORT:-target/bench/BENCHMARKS-$only.md} ;;
  *) echo "ONLY is history, classic or presence, not $only" >&2; exit 2 ;;
esac
classic() { [[ $only != history ]]; }
history_runs() { [[ $only != classic && " $systems " == *" channelgate "* ]]; }
mkdir -p bench/results target/bench
: >"$results"
ulimit -n 20000

echo "building release binaries"
cargo build --release -q -p channelgate -p channelgate-bench
if classic && [[ " $systems " == *" django "* ]]; then
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
# Further arguments are channelgate flags.
start_system() {
  local system=$1; shift
  ws_port=$(free_port)
  grpc_port=$(free_port)
  case $system in
    channelgate)
      taskset -c 0 ./target/release/channelgate --dev --jwt-secret "$secret" \
        --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" "$@" \
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
  if [[ $system == channelgate ]]; then wait_port "$grpc_port"; fi
}

# A redis-server and two channelgate nodes on it, all three on core 0, with the channelgate
# flags given; sets ws_ports, grpc_ports, node_pids and redis_pid.
start_cluster() {
  ws_ports=("$(free_port)" "$(free_port)")
  grpc_ports=("$(free_port)" "$(free_port)")
  local redis_port; redis_port=$(free_port)
  taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  redis_pid=$!; pids+=("$redis_pid")
  wait_port "$redis_port"
  node_pids=()
  for n in 0 1; do
    taskset -c 0 ./target/release/channelgate --dev --jwt-secret "$secret" --node-id "node-$n" \
      --redis-url "redis://127.0.0.1:$redis_port/" \
      --ws-addr "127.0.0.1:${ws_ports[n]}" --grpc-addr "127.0.0.1:${grpc_ports[n]}" "$@" \
      >"target/bench/node-$n.log" 2>&1 &
    node_pids+=($!); pids+=($!)
  done
  for n in 0 1; do wait_port "${ws_ports[n]}"; wait_port "${grpc_ports[n]}"; done
}

# The load generator on core 1 against channelgate, addresses and pids given as flags;
# stopped after five minutes whatever happens.
loadgen_cg() {
  timeout 300 taskset -c 1 ./target/release/loadgen --system channelgate --jwt-secret "$secret" "$@" \
    | tee -a "$results"
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
classic && for system in $systems; do
  echo "== $system: S2"
  start_system "$system"
  loadgen "$system" idle --conns 10000,19000 || true
  cleanup
done

# Throughput does move on a shared machine (a neighbour's burst can halve a run): the Rust
# systems take turns for $rounds rounds, and the report gives every round and the ratios of
# their medians. Django, far behind, runs once.
classic && for round in $(seq "$rounds"); do
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

if classic && [[ " $systems " == *" channelgate "* ]]; then
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

if history_runs; then
  # H1: the same fan-out with history on and off, one node and two on Redis, taking turns;
  # every server process (nodes and redis-server) counts.
  h1=(publish-cost --conns "$h1_conns" --groups $((h1_conns / 100)) --rate "$h1_rate" --secs "$h1_secs")
  for round in $(seq "$h1_rounds"); do
    # Odd rounds start with history on, even rounds with it off.
    order="on off"; if (( round % 2 == 0 )); then order="off on"; fi
    for history in $order; do
      echo "== channelgate: H1, one node, history $history, round $round"
      start_system channelgate --history "$history"
      loadgen_cg --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
        --server-pid "$server_pid" "${h1[@]}" --history "$history" --round "$round" || true
      cleanup
    done
    for history in $order; do
      echo "== channelgate: H1, two nodes on Redis, history $history, round $round"
      start_cluster --history "$history"
      loadgen_cg --ws-addr "127.0.0.1:${ws_ports[0]},127.0.0.1:${ws_ports[1]}" \
        --grpc-addr "127.0.0.1:${grpc_ports[0]}" --server-pid "${node_pids[0]}" \
        --server-pid "${node_pids[1]}" --server-pid "$redis_pid" \
        "${h1[@]}" --history "$history" --round "$round" || true
      cleanup
    done
  done

  # R1: a backlog replayed to one socket, from memory and from Redis (published through
  # one node, replayed on the other).
  replay_flags=(--replay-limit "$r1_events" --history-size "$r1_events")
  echo "== channelgate: R1, one node"
  start_system channelgate "${replay_flags[@]}"
  loadgen_cg --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
    --server-pid "$server_pid" replay-one --events "$r1_events" --store memory || true
  cleanup
  echo "== channelgate: R1, two nodes on Redis"
  start_cluster "${replay_flags[@]}"
  loadgen_cg --ws-addr "127.0.0.1:${ws_ports[0]}" --grpc-addr "127.0.0.1:${grpc_ports[1]}" \
    --server-pid "${node_pids[0]}" --server-pid "$redis_pid" \
    replay-one --events "$r1_events" --store redis || true
  cleanup

  # R2: node A is lost under its sockets, which all come back on node B at once.
  echo "== channelgate: R2, replay storm after a node loss"
  start_cluster
  # The load generator kills node A itself, once its sockets are in place; disowned, the
  # shell does not report that kill as a failure.
  disown "${node_pids[0]}"
  loadgen_cg --ws-addr "127.0.0.1:${ws_ports[0]},127.0.0.1:${ws_ports[1]}" \
    --grpc-addr "127.0.0.1:${grpc_ports[1]}" --server-pid "${node_pids[1]}" \
    --server-pid "$redis_pid" \
    replay-storm --sockets "$r2_sockets" --groups $((r2_sockets / 100 > 0 ? r2_sockets / 100 : 1)) \
    --kill-pid "${node_pids[0]}" || true
  cleanup
fi

python3 bench/report.py "$results" "$report"
echo "wrote $report"
