#!/usr/bin/env bash
# make bench: channelgate, the raw broadcaster (the machine's practical limit), sockudo (a
# Rust Pusher-protocol server, built with cargo install) and Django Channels (the system
# channelgate replaces), driven by one load generator with the same scenarios in one run;
# results in bench/results/latest.jsonl and BENCHMARKS.md.
#
# Every Rust server gets the same tokio worker count: one worker pinned to core 0 for the
# headline tables (the load generator on core 1, so they do not fight for a core), and
# WORKERS2 workers on cores 0-1 for a second S1 table (the generator, still on core 1,
# then shares a core with the server). Django/daphne is one process whatever the count.
# Each system is started afresh for each run. S1 and S3 hold each of a few fixed rates and
# report, per rate, delivered/expected, p50/p99, server CPU and deliveries per server
# CPU-second (deliveries over the CPU time the server's process used, from /proc): the
# primary figure, over all the fixed steps together, which a neighbour's burst moves far
# less than a rate does. Then each searches for the highest sustained rate (no loss, p99
# within 100 ms, S3 one second). The Rust systems take turns, the order swapped every
# round. About half an hour on 2 cores (sockudo adds ten minutes, and up to 40 minutes
# more for its first build; S5 on one Redis against a Redis Cluster, three minutes).
#
# Knobs (environment), defaults in brackets:
#   SYSTEMS    systems side by side ["channelgate raw sockudo django"]; Django runs once.
#              sockudo is built on first use by bench/peers/sockudo/setup.sh (cargo install
#              of sockudo 5.2.0 into ~/.cache/channelgate-bench/sockudo, or SOCKUDO_ROOT;
#              25-40 minutes on 2 cores, needs protoc) and skipped, saying why, when it
#              cannot be built. It runs in S1, S2, S3 and S4, its worker count given as
#              TOKIO_WORKER_THREADS, publishing through Pusher's HTTP API
#   ROUNDS     rounds of S1 and S3 on one worker [3]
#   ROUNDS2    rounds of S1 on WORKERS2 workers [3]
#   WORKERS2   the second table's worker count [2]; 0 skips that table
#   RATES      S1's fixed rates, deliveries/s, comma-separated [40000,65000,80000,95000]
#   S3_RATES   S3's fixed rates [250000,500000,800000]
#   RATE_SECS  seconds each fixed rate is held [4]
#   STEP_SECS  seconds of each step of the search for the highest sustained rate [2]
#   S6_GROUPS S6_SECS S6_ROUNDS  S6, publish ingest: groups (one socket each) [10000],
#              seconds per phase [5], rounds of one node and two nodes taking turns [2]
#   S6_KEYS    S6 without an idempotency key ("off") and with one per event ("on", 32 hex
#              characters each), taking turns within each setup and round ["off on"]
#   S6_BUSES   S6's setups: memory (one node), redis (two nodes through one redis-server),
#              cluster (two nodes through a Redis Cluster of three primaries and three
#              replicas, scripts/redis-cluster.sh) ["memory redis"]
#   S6_IN_FLIGHT S6_BATCH S6_BATCH_IN_FLIGHT  Publish calls in flight [32], events per
#              PublishBatch [100], PublishBatch calls in flight [4]
#   H1_ROUNDS H1_RATE H1_SECS H1_CONNS R1_EVENTS R2_SOCKETS  the history scenarios: H1,
#              publish cost with history on against off ([3] rounds taking turns, [30000]
#              deliveries/s for [4] s, [10000] sockets in groups of 100), R1, one socket
#              replaying [10000] events, and R2, a replay storm of [1000] sockets after a
#              node is killed
#   CLUSTER_ROUNDS  S5 on one redis-server against S5 on a Redis Cluster (three primaries
#              with a replica each, scripts/redis-cluster.sh; the same two nodes of one
#              worker, everything server-side on core 0, each redis-server's CPU read from
#              /proc before and after each run): rounds, the two taking turns [2; with
#              ONLY=cluster, ROUNDS when that is set]. Node and Redis logs are kept under
#              target/bench/s5-cluster/
#   ONLY       a part: classic (S1..S5), fanout (S1 and S3 only, both tables), ingest (S6),
#              history (H1, R1, R2), cluster (S5 on one Redis against S5 on a Redis
#              Cluster, as CLUSTER_ROUNDS says), presence (bench/presence.sh: P1,
#              presence in one space of 1,000, into bench/results/presence.jsonl and
#              target/bench/presence.md), or compression (bench/compression.sh: bytes on
#              the wire per delivery against Baserow's compressing stack, S1 with
#              clients offering permessage-deflate, RSS per connection; into
#              bench/results/compression.jsonl and target/bench/compression.md)
#   RESULTS REPORT  where the JSON lines and the report go [bench/results/latest.jsonl and
#              BENCHMARKS.md; with ONLY set, bench/results/$ONLY.jsonl and
#              target/bench/BENCHMARKS-$ONLY.md]
#
# `bash bench/callgrind.sh` counts instructions per delivery instead, which the machine's
# noise cannot move; `bash bench/ingest-callgrind.sh` counts them per Publish call (S6's
# cost, in BENCHMARKS.md "Publish cost in instructions (callgrind)").
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
if [[ ${ONLY:-} == presence ]]; then exec bash bench/presence.sh; fi
if [[ ${ONLY:-} == compression ]]; then exec bash bench/compression.sh; fi
root=$(pwd)
systems=${SYSTEMS:-"channelgate raw sockudo django"}
rounds=${ROUNDS:-3}
rounds2=${ROUNDS2:-3}
workers2=${WORKERS2:-2}
rates=${RATES:-40000,65000,80000,95000}
s3_rates=${S3_RATES:-250000,500000,800000}
rate_secs=${RATE_SECS:-4}
step_secs=${STEP_SECS:-2}
s6_groups=${S6_GROUPS:-10000}
s6_secs=${S6_SECS:-5}
s6_rounds=${S6_ROUNDS:-2}
s6_in_flight=${S6_IN_FLIGHT:-32}
s6_batch=${S6_BATCH:-100}
s6_batch_in_flight=${S6_BATCH_IN_FLIGHT:-4}
s6_keys=${S6_KEYS:-"off on"}
s6_buses=${S6_BUSES:-"memory redis"}
only=${ONLY:-}
h1_rounds=${H1_ROUNDS:-3}
h1_rate=${H1_RATE:-30000}
h1_secs=${H1_SECS:-4}
h1_conns=${H1_CONNS:-10000}
r1_events=${R1_EVENTS:-10000}
r2_sockets=${R2_SOCKETS:-1000}
cluster_rounds=${CLUSTER_ROUNDS:-2}
if [[ $only == cluster ]]; then cluster_rounds=${CLUSTER_ROUNDS:-${ROUNDS:-2}}; fi
case $only in
  "") results=${RESULTS:-bench/results/latest.jsonl}; report=${REPORT:-BENCHMARKS.md} ;;
  history|classic|fanout|ingest|cluster)
    results=${RESULTS:-bench/results/$only.jsonl}; report=${REPORT:-target/bench/BENCHMARKS-$only.md} ;;
  *) echo "ONLY is classic, fanout, ingest, history, cluster, presence or compression, not $only" >&2; exit 2 ;;
esac
has() { [[ " $systems " == *" $1 "* ]]; }
classic() { [[ -z $only || $only == classic ]]; }
fanout_runs() { [[ -z $only || $only == classic || $only == fanout ]]; }
ingest_runs() { [[ (-z $only || $only == ingest) ]] && has channelgate; }
history_runs() { [[ (-z $only || $only == history) ]] && has channelgate; }
redis_cluster_runs() { [[ (-z $only || $only == cluster) ]] && has channelgate; }
mkdir -p bench/results target/bench
: >"$results"
ulimit -n 20000

echo "building release binaries"
cargo build --release -q -p channelgate -p channelgate-bench
if fanout_runs && has django; then
  bash bench/peers/django/setup.sh
fi
if fanout_runs && has sockudo; then
  if ! sockudo_bin=$(bash bench/peers/sockudo/setup.sh); then
    echo "sockudo skipped: it could not be built (why is above)" >&2
    systems=$(for s in $systems; do [[ $s == sockudo ]] || printf '%s ' "$s"; done)
  fi
fi

secret=bench-secret
pids=()
# A Redis Cluster's servers are scripts/redis-cluster.sh's, stopped by it (it reads their
# pids from its directory).
redis_cluster_dir=
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  if [[ -n $redis_cluster_dir ]]; then
    bash scripts/redis-cluster.sh stop "$redis_cluster_dir" || true
    redis_cluster_dir=
  fi
  wait 2>/dev/null || true
  pids=()
}
trap cleanup EXIT

server_pid=
# Starts one system with WORKERS tokio workers on CORES (taskset's list) on fresh ports
# (reusing ports would meet the last run's TIME_WAIT sockets); sets ws_port, grpc_port and
# server_pid (whose CPU and RSS count). Further arguments are channelgate flags. Django is
# one daphne process (and a redis-server beside it, on the same cores) whatever WORKERS.
start_system() {
  local system=$1 workers=$2 cores=$3; shift 3
  ws_port=$(free_port)
  grpc_port=$(free_port)
  case $system in
    channelgate)
      taskset -c "$cores" ./target/release/channelgate --dev --jwt-secret "$secret" \
        --workers "$workers" --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" "$@" \
        >target/bench/channelgate.log 2>&1 &
      server_pid=$!; pids+=("$server_pid") ;;
    raw)
      # tokio's runtime takes its worker count from TOKIO_WORKER_THREADS.
      TOKIO_WORKER_THREADS=$workers taskset -c "$cores" ./target/release/rawcast "127.0.0.1:$ws_port" \
        >target/bench/raw.log 2>&1 &
      server_pid=$!; pids+=("$server_pid") ;;
    sockudo)
      # A plain #[tokio::main] too; run.sh execs sockudo, so the pid is the server's.
      TOKIO_WORKER_THREADS=$workers taskset -c "$cores" bash bench/peers/sockudo/run.sh "$ws_port" \
        "$sockudo_bin" >target/bench/sockudo.log 2>&1 &
      server_pid=$!; pids+=("$server_pid") ;;
    django)
      redis_port=$(free_port)
      taskset -c "$cores" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
      pids+=($!)
      wait_port "$redis_port" 10
      export REDIS_URL="redis://127.0.0.1:$redis_port/0" JWT_SECRET="$secret"
      taskset -c "$cores" bash bench/peers/django/run.sh "$ws_port" >target/bench/django.log 2>&1 &
      server_pid=$!; pids+=("$server_pid") ;;
    *) echo "unknown system $system (SYSTEMS: channelgate, raw, django)" >&2; exit 2 ;;
  esac
  wait_port "$ws_port" 10
  if [[ $system == channelgate ]]; then wait_port "$grpc_port" 10; fi
}

# A redis-server and two channelgate nodes on it, one worker each: node A and redis-server
# on CORES_A, node B on CORES_B, with the channelgate flags given; sets ws_ports, grpc_ports,
# node_pids and redis_pid.
start_cluster() {
  local cores_a=$1 cores_b=$2; shift 2
  local cores=("$cores_a" "$cores_b")
  ws_ports=("$(free_port)" "$(free_port)")
  grpc_ports=("$(free_port)" "$(free_port)")
  local redis_port; redis_port=$(free_port)
  taskset -c "$cores_a" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  redis_pid=$!; pids+=("$redis_pid")
  wait_port "$redis_port" 10
  node_pids=()
  for n in 0 1; do
    taskset -c "${cores[n]}" ./target/release/channelgate --dev --jwt-secret "$secret" --node-id "node-$n" \
      --workers 1 --redis-url "redis://127.0.0.1:$redis_port/" \
      --ws-addr "127.0.0.1:${ws_ports[n]}" --grpc-addr "127.0.0.1:${grpc_ports[n]}" "$@" \
      >"target/bench/node-$n.log" 2>&1 &
    node_pids+=($!); pids+=($!)
  done
  for n in 0 1; do wait_port "${ws_ports[n]}" 10; wait_port "${grpc_ports[n]}" 10; done
}

# The load generator on core 1 against channelgate, addresses and pids given as flags;
# stopped after five minutes whatever happens.
loadgen_cg() {
  timeout 300 taskset -c 1 ./target/release/loadgen --system channelgate --jwt-secret "$secret" "$@" \
    | tee -a "$results"
}

# The load generator on core 1 against the system start_system started; stopped after ten
# minutes whatever happens (Django's 19,000 sockets take a minute and a half to open).
loadgen() { # system, scenario args...
  local system=$1; shift
  timeout 600 taskset -c 1 ./target/release/loadgen --system "$system" --jwt-secret "$secret" \
    --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
    --server-pid "$server_pid" \
    --django-publisher "$root/bench/.venv-django/bin/python $root/bench/peers/django/publisher.py" \
    "$@" | tee -a "$results"
}

# The Rust systems in the order of a round: as given in odd rounds, reversed in even ones.
rust_order() { # round
  local list=() s
  for s in $systems; do [[ $s == django ]] || list+=("$s"); done
  if (( $1 % 2 == 0 )); then
    local reversed=() i
    for (( i = ${#list[@]} - 1; i >= 0; i-- )); do reversed+=("${list[i]}"); done
    list=("${reversed[@]}")
  fi
  echo "${list[@]}"
}

# S1 on one system: WORKERS workers on CORES, round ROUND. Its 10,000 sockets open as fast
# as they go: that opening is S4's connect storm. Django has no fixed rates (it sustains a
# few hundred deliveries a second): its search starts at 200.
s1() { # system workers cores round
  local system=$1 workers=$2 cores=$3 round=$4
  echo "== $system: S1 and S4, $workers worker(s) on cores $cores, round $round"
  start_system "$system" "$workers" "$cores"
  if [[ $system == django ]]; then
    loadgen "$system" fanout-search --scenario S1 --storm-scenario S4 --conns 10000 --groups 100 \
      --start-rate 200 --step-secs "$step_secs" --round "$round" || true
  else
    loadgen "$system" fanout-search --scenario S1 --storm-scenario S4 --conns 10000 --groups 100 \
      --rates "$rates" --rate-secs "$rate_secs" --start-rate 40000 --step-secs "$step_secs" \
      --workers "$workers" --round "$round" || true
  fi
  cleanup
}

# S3 likewise. One event reaches 5,000 sockets one write at a time, so its last delivery
# comes a fan-out later; a step therefore holds with a p99 up to one second, not 100 ms.
s3() { # system workers cores round
  local system=$1 workers=$2 cores=$3 round=$4
  echo "== $system: S3, $workers worker(s) on cores $cores, round $round"
  start_system "$system" "$workers" "$cores"
  if [[ $system == django ]]; then
    loadgen "$system" fanout-search --scenario S3 --conns 5000 --groups 1 --max-p99-ms 1000 \
      --start-rate 5000 --step-secs "$step_secs" --round "$round" || true
  else
    loadgen "$system" fanout-search --scenario S3 --conns 5000 --groups 1 --max-p99-ms 1000 \
      --rates "$s3_rates" --rate-secs "$rate_secs" --start-rate 400000 --step-secs "$step_secs" \
      --workers "$workers" --round "$round" || true
  fi
  cleanup
}

# Memory per idle connection barely moves between runs: one round, one worker.
classic && for system in $systems; do
  echo "== $system: S2"
  start_system "$system" 1 0
  loadgen "$system" idle --conns 10000,19000 || true
  cleanup
done

# The headline: one worker on core 0, the Rust systems taking turns; Django once.
if fanout_runs; then
  for round in $(seq "$rounds"); do
    for system in $(rust_order "$round"); do
      s1 "$system" 1 0 "$round"
      s3 "$system" 1 0 "$round"
    done
    if (( round == 1 )) && has django; then
      s1 django 1 0 1
      s3 django 1 0 1
    fi
  done
  # The second table: WORKERS2 workers on cores 0-1, the generator still on core 1.
  if (( workers2 > 0 )); then
    for round in $(seq "$rounds2"); do
      for system in $(rust_order "$round"); do
        s1 "$system" "$workers2" "0-1" "$round"
      done
    done
  fi
fi

if classic && has channelgate; then
  # Every server process counts: both nodes and redis-server, all on core 0.
  echo "== channelgate, two nodes through Redis (S5)"
  start_cluster 0 0
  loadgen_cg --ws-addr "127.0.0.1:${ws_ports[0]},127.0.0.1:${ws_ports[1]}" --grpc-addr "127.0.0.1:${grpc_ports[0]}" \
    --server-pid "${node_pids[0]}" --server-pid "${node_pids[1]}" --server-pid "$redis_pid" \
    fanout-search --scenario S5 --conns 10000 --groups 100 --rates "$rates" --rate-secs "$rate_secs" \
    --start-rate 40000 --step-secs "$step_secs" --workers 1 || true
  cleanup
fi

# A first port of six in a row that are free with their cluster bus ports (+10000),
# below the ephemeral range so that no client socket holds one.
free_cluster_base() {
  python3 - <<'PY'
import random, socket
for _ in range(200):
    base = random.randrange(10000, 22000)
    ports = [p for q in range(base, base + 6) for p in (q, q + 10000)]
    held = []
    try:
        for p in ports:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        for s in held:
            s.close()
    print(base)
    break
else:
    raise SystemExit("no six free ports in a row for a Redis Cluster")
PY
}

if redis_cluster_runs; then
  # S5 on one redis-server against S5 on a Redis Cluster: the same two nodes of one worker,
  # the same sockets and rates, everything server-side (both nodes and every redis-server,
  # the cluster's replicas too) on core 0 as in S5, the load generator on core 1. Every
  # server process's CPU counts for deliveries per CPU-second; each redis-server's own CPU
  # is read from /proc before and after each run, and its role with redis-cli.
  clk_tck=$(getconf CLK_TCK)

  # CPU ticks (utime + stime, fields 14 and 15 of /proc/PID/stat; the command name may
  # hold spaces, so counted from its closing bracket), or "null" once the process is gone.
  cpu_ticks() {
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo null; return; }
    read -ra fields <<<"${stat##*) }"
    echo $((fields[11] + fields[12]))
  }

  # "primary", or "replica of PORT", from `redis-cli role`.
  redis_role() {
    local role=()
    mapfile -t role < <(redis-cli -p "$1" role 2>/dev/null || true)
    case ${role[0]:-} in
      master) echo primary ;;
      slave) echo "replica of ${role[2]:-?}" ;;
      *) echo "unknown" ;;
    esac
  }

  # One redis-server (BUS redis) or a Redis Cluster (BUS cluster) and two channelgate nodes
  # on it, one worker each, all on core 0; sets ws_ports, grpc_ports, node_pids,
  # redis_pids, redis_ports and run_dir (the run's logs).
  start_s5_bus() { # bus round
    local bus=$1 round=$2 n bus_flags nodes base
    run_dir=target/bench/s5-cluster/$bus-round-$round
    rm -rf "$run_dir"; mkdir -p "$run_dir"
    ws_ports=("$(free_port)" "$(free_port)")
    grpc_ports=("$(free_port)" "$(free_port)")
    if [[ $bus == redis ]]; then
      redis_ports=("$(free_port)")
      taskset -c 0 redis-server --port "${redis_ports[0]}" --bind 127.0.0.1 --save "" --appendonly no \
        >"$run_dir/redis.log" 2>&1 &
      redis_pids=($!); pids+=($!)
      wait_port "${redis_ports[0]}" 10
      bus_flags=(--redis-url "redis://127.0.0.1:${redis_ports[0]}/")
    else
      base=$(free_cluster_base)
      redis_cluster_dir=$run_dir/redis-cluster
      # The servers inherit the affinity of the script that starts them.
      nodes=$(taskset -c 0 bash scripts/redis-cluster.sh start "$redis_cluster_dir" "$base")
      mapfile -t redis_pids <"$redis_cluster_dir/pids"
      mapfile -t redis_ports < <(seq "$base" $((base + 5)))
      bus_flags=(--redis-cluster-nodes "$nodes")
    fi
    node_pids=()
    for n in 0 1; do
      taskset -c 0 ./target/release/channelgate --dev --jwt-secret "$secret" --node-id "node-$n" \
        --workers 1 "${bus_flags[@]}" \
        --ws-addr "127.0.0.1:${ws_ports[n]}" --grpc-addr "127.0.0.1:${grpc_ports[n]}" \
        >"$run_dir/node-$n.log" 2>&1 &
      node_pids+=($!); pids+=($!)
    done
    for n in 0 1; do wait_port "${ws_ports[n]}" 10; wait_port "${grpc_ports[n]}" 10; done
  }

  s5_bus() { # bus round
    local bus=$1 round=$2 i pid pid_flags=() before=() after=() roles=() roles_after=()
    local node_before=() node_after=() log_lines=() warnings=0 n
    if [[ $bus == redis ]]; then
      echo "== channelgate: S5 on one redis-server, round $round"
    else
      echo "== channelgate: S5 on a Redis Cluster (3 primaries, 3 replicas), round $round"
    fi
    start_s5_bus "$bus" "$round"
    for pid in "${node_pids[@]}" "${redis_pids[@]}"; do pid_flags+=(--server-pid "$pid"); done
    for i in "${!redis_ports[@]}"; do roles+=("$(redis_role "${redis_ports[i]}")"); done
    for pid in "${redis_pids[@]}"; do before+=("$(cpu_ticks "$pid")"); done
    for pid in "${node_pids[@]}"; do node_before+=("$(cpu_ticks "$pid")"); done
    # What the nodes log from here on (their start-up warnings of --dev are above it).
    for n in 0 1; do log_lines+=("$(wc -l <"$run_dir/node-$n.log")"); done
    loadgen_cg --ws-addr "127.0.0.1:${ws_ports[0]},127.0.0.1:${ws_ports[1]}" --grpc-addr "127.0.0.1:${grpc_ports[0]}" \
      "${pid_flags[@]}" fanout-search --scenario "S5-$bus" --conns 10000 --groups 100 --rates "$rates" \
      --rate-secs "$rate_secs" --start-rate 40000 --step-secs "$step_secs" --workers 1 --round "$round" || true
    for pid in "${redis_pids[@]}"; do after+=("$(cpu_ticks "$pid")"); done
    for pid in "${node_pids[@]}"; do node_after+=("$(cpu_ticks "$pid")"); done
    for i in "${!redis_ports[@]}"; do roles_after+=("$(redis_role "${redis_ports[i]}")"); done
    for n in 0 1; do
      warnings=$((warnings + $(tail -n +$((log_lines[n] + 1)) "$run_dir/node-$n.log" | grep -cE '\b(WARN|ERROR)\b' || true)))
    done
    # One line of each redis-server's CPU over the run: port, pid, role before and after,
    # ticks before and after, tab-separated, made JSON for the report.
    for i in "${!redis_ports[@]}"; do
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "${redis_ports[i]}" "${redis_pids[i]}" "${roles[i]}" \
        "${roles_after[i]}" "${before[i]}" "${after[i]}"
    done | python3 -c '
import json, sys
bus, round_, tck, nodes, warnings = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
def secs(b, a):
    return None if "null" in (b, a) else round((int(a) - int(b)) / tck, 2)
servers = []
for line in sys.stdin:
    port, pid, role, role_after, b, a = line.rstrip("\n").split("\t")
    servers.append({"port": int(port), "pid": int(pid), "role": role, "role_after": role_after, "cpu_secs": secs(b, a)})
node_secs = [secs(*pair.split(":")) for pair in nodes.split()]
print(json.dumps({"scenario": "S5-redis-cpu", "bus": bus, "round": round_, "clk_tck": tck,
    "servers": servers, "node_cpu_secs": node_secs, "node_log_warnings": warnings}))
' "$bus" "$round" "$clk_tck" "$(for i in 0 1; do printf '%s:%s ' "${node_before[i]}" "${node_after[i]}"; done)" \
      "$warnings" | tee -a "$results"
    cleanup
  }

  for round in $(seq "$cluster_rounds"); do
    order="redis cluster"; if (( round % 2 == 0 )); then order="cluster redis"; fi
    for bus in $order; do s5_bus "$bus" "$round"; done
  done
fi

if ingest_runs; then
  # S6: one socket in each of S6_GROUPS groups, Publish with S6_IN_FLIGHT calls in flight,
  # then PublishBatch. One node: on core 0, the generator on core 1. Two nodes: node A
  # (which the generator publishes through) and redis-server (on a Redis Cluster, all six)
  # on core 0, node B with the generator on core 1; the sockets alternate between the
  # nodes, so half the events cross Redis to node B. The setups take turns, and within each
  # setup runs without and with idempotency keys (S6_KEYS); both orders swap every round.
  s6=(ingest --groups "$s6_groups" --secs "$s6_secs" --in-flight "$s6_in_flight"
    --batch "$s6_batch" --batch-in-flight "$s6_batch_in_flight")
  reversed() { local out=() i; for (( i = $#; i >= 1; i-- )); do out+=("${!i}"); done; echo "${out[@]}"; }
  for round in $(seq "$s6_rounds"); do
    # shellcheck disable=SC2086
    buses=$s6_buses keyings=$s6_keys
    # shellcheck disable=SC2086
    if (( round % 2 == 0 )); then buses=$(reversed $s6_buses); keyings=$(reversed $s6_keys); fi
    for bus in $buses; do
      for keying in $keyings; do
        key_flags=(); with=""
        if [[ $keying == on ]]; then key_flags=(--keys); with=", a key per event"; fi
        case $bus in
          memory)
            echo "== channelgate: S6, one node$with, round $round"
            start_system channelgate 1 0
            loadgen_cg --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
              --server-pid "$server_pid" "${s6[@]}" "${key_flags[@]}" --bus memory --round "$round" || true ;;
          redis)
            echo "== channelgate: S6, two nodes through Redis$with, round $round"
            start_cluster 0 1
            loadgen_cg --ws-addr "127.0.0.1:${ws_ports[0]},127.0.0.1:${ws_ports[1]}" \
              --grpc-addr "127.0.0.1:${grpc_ports[0]}" --server-pid "${node_pids[0]}" \
              --server-pid "${node_pids[1]}" --server-pid "$redis_pid" "${s6[@]}" "${key_flags[@]}" \
              --bus redis --round "$round" || true ;;
          cluster)
            echo "== channelgate: S6, two nodes through a Redis Cluster$with, round $round"
            run_dir=target/bench/s6-cluster/round-$round-keys-$keying
            rm -rf "$run_dir"; mkdir -p "$run_dir"
            redis_cluster_dir=$run_dir/redis-cluster
            # The servers inherit the affinity of the script that starts them.
            cluster_nodes=$(taskset -c 0 bash scripts/redis-cluster.sh start "$redis_cluster_dir" "$(free_cluster_base)")
            mapfile -t cluster_pids <"$redis_cluster_dir/pids"
            ws_ports=("$(free_port)" "$(free_port)")
            grpc_ports=("$(free_port)" "$(free_port)")
            node_pids=()
            for n in 0 1; do
              taskset -c "$n" ./target/release/channelgate --dev --jwt-secret "$secret" --node-id "node-$n" \
                --workers 1 --redis-cluster-nodes "$cluster_nodes" \
                --ws-addr "127.0.0.1:${ws_ports[n]}" --grpc-addr "127.0.0.1:${grpc_ports[n]}" \
                >"$run_dir/node-$n.log" 2>&1 &
              node_pids+=($!); pids+=($!)
            done
            for n in 0 1; do wait_port "${ws_ports[n]}" 10; wait_port "${grpc_ports[n]}" 10; done
            pid_flags=()
            for pid in "${node_pids[@]}" "${cluster_pids[@]}"; do pid_flags+=(--server-pid "$pid"); done
            loadgen_cg --ws-addr "127.0.0.1:${ws_ports[0]},127.0.0.1:${ws_ports[1]}" \
              --grpc-addr "127.0.0.1:${grpc_ports[0]}" "${pid_flags[@]}" "${s6[@]}" "${key_flags[@]}" \
              --bus cluster --round "$round" || true ;;
          *) echo "S6_BUSES holds memory, redis or cluster, not $bus" >&2; exit 2 ;;
        esac
        cleanup
      done
    done
  done
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
      start_system channelgate 1 0 --history "$history"
      loadgen_cg --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
        --server-pid "$server_pid" "${h1[@]}" --history "$history" --round "$round" || true
      cleanup
    done
    for history in $order; do
      echo "== channelgate: H1, two nodes on Redis, history $history, round $round"
      start_cluster 0 0 --history "$history"
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
  start_system channelgate 1 0 "${replay_flags[@]}"
  loadgen_cg --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
    --server-pid "$server_pid" replay-one --events "$r1_events" --store memory || true
  cleanup
  echo "== channelgate: R1, two nodes on Redis"
  start_cluster 0 0 "${replay_flags[@]}"
  loadgen_cg --ws-addr "127.0.0.1:${ws_ports[0]}" --grpc-addr "127.0.0.1:${grpc_ports[1]}" \
    --server-pid "${node_pids[0]}" --server-pid "$redis_pid" \
    replay-one --events "$r1_events" --store redis || true
  cleanup

  # R2: node A is lost under its sockets, which all come back on node B at once.
  echo "== channelgate: R2, replay storm after a node loss"
  start_cluster 0 0
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
