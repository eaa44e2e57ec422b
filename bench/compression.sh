#!/usr/bin/env bash
# The compression benchmark: channelgate with --compression off, shared and auto against
# Baserow's own stack (the Django Channels peer served by uvicorn with `websockets`, which
# compresses with context per connection, zlib's defaults) and the same peer under daphne
# (no compression), side by side in one run, the systems taking turns, the order rotated
# every round. Every subscriber offers permessage-deflate as a browser does
# (`permessage-deflate; client_max_window_bits`), inflates what it gets with its own
# inflater and checks it (bench/src/bin/compression.rs). Parts (PARTS):
#
#   wire    bytes its TCP socket read per delivery (frame headers included), for the
#           streams of bench/compression_streams.py: the recorded Baserow session once
#           (session-1) and 20 times with other ids (session-20), each of its sockets' events
#           to a socket of its own; and `rows_updated` of rows with 20 fields (rows) to a table
#           watched by 1, 4 and 16 sockets. Baserow's stack twice: as the session was
#           recorded (uvicorn), and with the event id Baserow's backend appends to every
#           payload it records for replay (uvicorn-ids, `,"_event_id":N` from one sequence,
#           as channelgate does with history on, its default). Besides the three modes,
#           auto at zlib level 6 (auto-level6) and auto with --history off
#           (auto-nohistory, to compare with uvicorn) say what the defaults buy.
#           WIRE_ROUNDS rounds [2]; each system is started afresh for each round, one
#           worker on core 0 (daphne and uvicorn: one process, with a redis-server), the
#           generator on core 1. WIRE_SYSTEMS names fewer.
#   s1      S1 (10,000 sockets in 100 groups of 100, one worker pinned to core 0, fixed rates
#           S1_RATES for RATE_SECS each, then the highest sustained rate) with compression
#           off, shared and auto; S1_ROUNDS rounds [3]. An S1 event reaches 100 sockets, so
#           auto compresses it once, shared, like --compression shared.
#   memory  MEM_CONNS sockets [5000] each in a group of its own: server RSS per connection
#           idle, after MEM_EVENTS row updates each [3] (auto: each on the socket's own deflate
#           stream), and 12 s later (streams dropped after 10 s idle); channelgate off and
#           auto, MEM_ROUNDS rounds [2], and uvicorn once (MEM_UVICORN=0 skips it).
#
# Results: bench/results/compression.jsonl (RESULTS), tables from
# bench/compression_report.py into target/bench/compression.md (REPORT).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
parts=${PARTS:-"wire s1 memory"}
wire_rounds=${WIRE_ROUNDS:-2}
s1_rounds=${S1_ROUNDS:-3}
s1_rates=${S1_RATES:-20000,30000,40000}
rate_secs=${RATE_SECS:-4}
step_secs=${STEP_SECS:-2}
mem_conns=${MEM_CONNS:-5000}
mem_events=${MEM_EVENTS:-3}
mem_rounds=${MEM_ROUNDS:-2}
mem_uvicorn=${MEM_UVICORN:-1}
wire_systems=${WIRE_SYSTEMS:-"channelgate-off channelgate-shared channelgate-auto uvicorn-ids
  channelgate-auto-level6 channelgate-auto-nohistory uvicorn daphne"}
results=${RESULTS:-bench/results/compression.jsonl}
report=${REPORT:-target/bench/compression.md}
session_file=${SESSION_FILE:-../shared/data/baserow-session-frames.json}
streams=target/bench/compression
root=$(pwd)
secret=bench-secret
mkdir -p bench/results "$streams"
: >"$results"
ulimit -n 20000

echo "building release binaries"
cargo build --release -q -p channelgate -p channelgate-bench
bash bench/peers/django/setup.sh
python3 bench/compression_streams.py "$session_file" "$streams"

pids=()
publisher_flags=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  pids=()
}
trap cleanup EXIT

# Starts SYSTEM (channelgate-off|-shared|-auto|-auto15|-auto-nohistory, uvicorn, daphne)
# on core 0, one worker; sets ws_port, grpc_port, server_pid and gen_system.
start() {
  local system=$1
  ws_port=$(free_port); grpc_port=$(free_port)
  case $system in
    channelgate-*)
      local flags
      case ${system#channelgate-} in
        off|shared|auto) flags=(--compression "${system#channelgate-}") ;;
        # auto at zlib's default level rather than its best, and auto without the
        # history ids that channelgate appends to every payload by default.
        auto-level6) flags=(--compression auto --compression-level 6) ;;
        auto-nohistory) flags=(--compression auto --history off) ;;
        *) echo "unknown system $system" >&2; exit 2 ;;
      esac
      taskset -c 0 ./target/release/channelgate --dev --jwt-secret "$secret" --workers 1 "${flags[@]}" \
        --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" \
        >target/bench/channelgate-compression.log 2>&1 &
      server_pid=$!; pids+=("$server_pid"); gen_system=channelgate
      wait_port "$ws_port" 20; wait_port "$grpc_port" 20 ;;
    uvicorn|uvicorn-ids|daphne)
      local redis_port; redis_port=$(free_port)
      taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
      pids+=($!)
      wait_port "$redis_port" 20
      export REDIS_URL="redis://127.0.0.1:$redis_port/0" JWT_SECRET="$secret"
      local server=${system%-ids}
      publisher_flags=()
      [[ $system == *-ids ]] && publisher_flags=(--event-ids)
      taskset -c 0 bash bench/peers/django/run.sh "$ws_port" "$server" >"target/bench/$system.log" 2>&1 &
      server_pid=$!; pids+=("$server_pid"); gen_system=django
      wait_port "$ws_port" 20 ;;
    *) echo "unknown system $system" >&2; exit 2 ;;
  esac
}

gen() { # label round args...
  local label=$1 round=$2; shift 2
  timeout 600 taskset -c 1 ./target/release/compression --system "$gen_system" --label "$label" \
    --round "$round" --jwt-secret "$secret" --ws-addr "127.0.0.1:$ws_port" \
    --grpc-addr "127.0.0.1:$grpc_port" --server-pid "$server_pid" \
    --django-publisher "$root/bench/.venv-django/bin/python $root/bench/peers/django/publisher.py ${publisher_flags[*]}" \
    "$@" | tee -a "$results"
}

# The list rotated by ROUND - 1 places.
rotate() { # round items...
  local round=$1; shift
  local items=("$@") n=$# i
  for (( i = 0; i < n; i++ )); do printf '%s ' "${items[(i + round - 1) % n]}"; done
}

if [[ " $parts " == *" wire "* ]]; then
  for round in $(seq "$wire_rounds"); do
    for system in $(rotate "$round" $wire_systems); do
      echo "== $system: wire bytes, round $round"
      start "$system"
      # Sockets ask for the replay baseline where the server keeps a history, as Baserow's
      # browser client does on connecting (the Django peer has no replay to ask).
      baseline=()
      [[ $system == channelgate-* && $system != *nohistory ]] && baseline=(--baseline)
      gen "$system" "$round" wire --stream "$streams/session-1.jsonl" --stream-name session-1 \
        "${baseline[@]}" || true
      gen "$system" "$round" wire --stream "$streams/session-20.jsonl" --stream-name session-20 \
        "${baseline[@]}" || true
      for watchers in 1 4 16; do
        gen "$system" "$round" wire --stream "$streams/rows.jsonl" --stream-name rows \
          --watchers "$watchers" "${baseline[@]}" || true
      done
      cleanup
    done
  done
fi

if [[ " $parts " == *" s1 "* ]]; then
  for round in $(seq "$s1_rounds"); do
    for system in $(rotate "$round" channelgate-off channelgate-shared channelgate-auto); do
      echo "== $system: S1 with clients offering permessage-deflate, round $round"
      start "$system"
      gen "$system" "$round" fanout --scenario "S1-deflate-${system#channelgate-}" --conns 10000 \
        --groups 100 --rates "$s1_rates" --rate-secs "$rate_secs" --start-rate 40000 \
        --step-secs "$step_secs" --workers 1 || true
      cleanup
    done
  done
fi

if [[ " $parts " == *" memory "* ]]; then
  for round in $(seq "$mem_rounds"); do
    for system in $(rotate "$round" channelgate-off channelgate-auto); do
      echo "== $system: memory, round $round"
      start "$system"
      gen "$system" "$round" memory --conns "$mem_conns" --events "$mem_events" || true
      cleanup
    done
  done
  if [[ $mem_uvicorn == 1 ]]; then
    echo "== uvicorn: memory"
    start uvicorn
    gen uvicorn 1 memory --conns "$mem_conns" --events "$mem_events" || true
    cleanup
  fi
fi

python3 bench/compression_report.py "$results" >"$report"
echo "wrote $report"
