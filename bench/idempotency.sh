#!/usr/bin/env bash
# What an idempotency key costs, in counts that the machine's noise moves little or not at
# all (S6 with S6_KEYS measures rates and CPU instead: `ONLY=ingest bash bench/run.sh`).
# Every event gets a key of its own, 32 hex characters like a client's uuid4 hex
# (`loadgen publish-count --keys`); each variant is run without and with keys on servers
# started afresh, a redis-server of this script's own on a free port where Redis is used.
#
# PARTS, any of:
#   callgrind     user-space instructions per Publish, one node (in-memory bus) and one node
#                 on Redis: the node under valgrind's callgrind with one tokio worker (and,
#                 on Redis, redis-server under callgrind too unless REDIS_CALLGRIND=0; a
#                 node this slow finds Redis not ready for its first publish or two and
#                 answers UNAVAILABLE, which the load generator retries and reports as
#                 unavailable_retries, the same in both counts), EVENTS (two counts, N and 2N)
#                 published one call at a time, each awaited; per Publish = the difference between the
#                 two counts' totals over the extra events, so start-up, connects and
#                 subscribes cancel out. REPEATS runs of each. NGROUPS 0 (the default):
#                 every event goes to one group with no socket, so only the publish path
#                 counts; NGROUPS N: N groups of one socket each, deliveries counted too.
#   commandstats  redis-server's own time per publish script call: one node on Redis
#                 natively, STATS_EVENTS Publish calls (8 in flight), `INFO commandstats`
#                 (EVALSHA's usec per call, reset just before) and redis-server's CPU from
#                 /proc; ROUNDS rounds, without and with keys taking turns.
#   memory        bytes per key: MEMORY_EVENTS events (PublishBatch of 500) through one node
#                 on Redis with --history off and on, without and with keys: `INFO memory`
#                 used_memory and DBSIZE before and after, MEMORY USAGE of one key; and the
#                 one node's RSS (in-memory bus, which keeps at most --idempotency-keys,
#                 100,000 by default) before and after the same events.
#
#   bash bench/idempotency.sh   # PARTS="callgrind commandstats memory" EVENTS="2000 4000"
#                               # NGROUPS=0 REPEATS=1 STATS_EVENTS=20000 ROUNDS=2
#                               # MEMORY_EVENTS=100000
# BUILD=0 uses the release binaries already in target/release instead of building them.
# Output: a Markdown summary on standard output and in target/bench/idempotency.md, the
# JSON lines of every run in target/bench/idempotency/runs.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
parts=${PARTS:-"callgrind commandstats memory"}
read -r low high <<<"${EVENTS:-2000 4000}"
groups=${NGROUPS:-0}
repeats=${REPEATS:-1}
stats_events=${STATS_EVENTS:-20000}
rounds=${ROUNDS:-2}
memory_events=${MEMORY_EVENTS:-100000}
secret=bench-secret
out=target/bench/idempotency
mkdir -p "$out"
runs=$out/runs.jsonl
: >"$runs"
ulimit -n 20000
command -v redis-server >/dev/null || { echo "redis-server is missing" >&2; exit 1; }
if [[ " $parts " == *" callgrind "* ]]; then
  command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
fi
if [[ ${BUILD:-1} != 0 ]]; then cargo build --release -q -p channelgate -p channelgate-bench; fi
commit=$(commit_label)

cpu_ticks() { local stat fields; stat=$(cat "/proc/$1/stat"); read -ra fields <<<"${stat##*) }"; echo $((fields[11] + fields[12])); }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
info_field() { redis-cli -p "$1" info "$2" | tr -d '\r' | awk -F: -v k="$3" '$1 == k { print $2 }'; }

node_pid= redis_pid= redis_port=
# Stops a process with SIGTERM (callgrind then writes its counts), at most a minute.
stop_all() {
  stop_pid "$node_pid"; node_pid=
  if [[ -n $redis_pid ]]; then
    # SHUTDOWN NOSAVE ends redis-server (under callgrind too) the way it writes its counts.
    redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
    stop_pid "$redis_pid"; redis_pid=
  fi
}
trap stop_all EXIT

# A redis-server on a free port, optionally under callgrind (file given): sets redis_pid,
# redis_port.
start_redis() { # [callgrind-file]
  redis_port=$(free_port)
  if [[ -n ${1:-} ]]; then
    valgrind --tool=callgrind --callgrind-out-file="$1" \
      redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$out/redis.log" 2>&1 &
  else
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$out/redis.log" 2>&1 &
  fi
  redis_pid=$!
  wait_port "$redis_port" 60
}

# One channelgate node of one worker on a free port, under callgrind when a file is
# given: sets node_pid, ws, grpc. Further arguments are channelgate flags.
start_node() { # callgrind-file-or-empty flags...
  local file=$1; shift
  ws=$(free_port); grpc=$(free_port)
  local cmd=(./target/release/channelgate --dev --jwt-secret "$secret" --workers 1
    --ping-interval-ms 3600000 --handshake-timeout-ms 120000
    --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" "$@")
  if [[ -n $file ]]; then
    valgrind --tool=callgrind --callgrind-out-file="$file" "${cmd[@]}" >"$out/node.log" 2>&1 &
  else
    "${cmd[@]}" >"$out/node.log" 2>&1 &
  fi
  node_pid=$!
  wait_port "$ws" 60; wait_port "$grpc" 60
}

loadgen() { # label publish-count flags...
  timeout 900 ./target/release/loadgen --jwt-secret "$@" | tee -a "$runs"
}

ir_total() { awk '/^summary:/ { print $2 }' "$1"; }

summary=()

if [[ " $parts " == *" callgrind "* ]]; then
  rows=()
  declare -A per
  for bus in memory redis; do
    for keys in off on; do
      for rep in $(seq "$repeats"); do
        declare -A node_ir=() redis_ir=()
        for events in "$low" "$high"; do
          echo "callgrind: $bus, keys $keys, $events events, run $rep" >&2
          node_file=$out/node-$bus-$keys-$events-$rep.out redis_file=$out/redis-$bus-$keys-$events-$rep.out
          rm -f "$node_file" "$redis_file"
          flags=()
          if [[ $bus == redis ]]; then
            if [[ ${REDIS_CALLGRIND:-1} == 1 ]]; then start_redis "$redis_file"; else start_redis; fi
            flags=(--redis-url "redis://127.0.0.1:$redis_port/")
          fi
          start_node "$node_file" "${flags[@]}"
          key_flag=(); [[ $keys == on ]] && key_flag=(--keys)
          loadgen "$secret" --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" \
            publish-count --groups "$groups" --events "$events" --in-flight 1 "${key_flag[@]}" \
            --label "callgrind $bus keys-$keys $events" >/dev/null
          stop_all
          node_ir[$events]=$(ir_total "$node_file")
          if [[ $bus == redis && ${REDIS_CALLGRIND:-1} == 1 ]]; then redis_ir[$events]=$(ir_total "$redis_file"); fi
        done
        n=$(( (node_ir[$high] - node_ir[$low]) / (high - low) ))
        r=
        if [[ $bus == redis && ${REDIS_CALLGRIND:-1} == 1 ]]; then r=$(( (redis_ir[$high] - redis_ir[$low]) / (high - low) )); fi
        per[$bus,$keys,$rep]="$n ${r:-0}"
        printf '{"scenario":"callgrind-per-publish","bus":"%s","keys":"%s","run":%s,"node_ir":%s,"redis_ir":%s}\n' \
          "$bus" "$keys" "$rep" "$n" "${r:-null}" | tee -a "$runs"
      done
    done
  done
  table=$(python3 - "$runs" "$repeats" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"callgrind-per-publish"' in l]
def vals(bus, keys, what):
    return [r[what] for r in rows if r["bus"] == bus and r["keys"] == keys and r[what] is not None]
def show(v):
    return f"{sorted(v)[len(v) // 2]:,}" + (f" ({min(v):,}–{max(v):,})" if len(v) > 1 else "")
def med(v):
    v = sorted(v); return v[len(v) // 2]
print("| bus | process | instructions per Publish, no key | with a key | the key's cost |")
print("|---|---|---|---|---|")
for bus, label in (("memory", "one node, in-memory bus"), ("redis", "one node on Redis")):
    for what, proc in (("node_ir", "channelgate node"), ("redis_ir", "redis-server")):
        off, on = vals(bus, "off", what), vals(bus, "on", what)
        if not off or not on:
            continue
        d = med(on) - med(off)
        print(f"| {label} | {proc} | {show(off)} | {show(on)} | {d:+,} ({d / med(off) * 100:+.1f} %) |")
PY
)
  summary+=("Instructions per Publish (user space; $groups groups of one socket (0: one group with none), $low and $high events one call at a time, one tokio worker; $repeats run(s) each):" "" "$table" "")
fi

if [[ " $parts " == *" commandstats "* ]]; then
  for round in $(seq "$rounds"); do
    order="off on"; if (( round % 2 == 0 )); then order="on off"; fi
    for keys in $order; do
      echo "commandstats: keys $keys, round $round" >&2
      start_redis
      start_node "" --redis-url "redis://127.0.0.1:$redis_port/"
      # Connects and subscribes first (a short warm-up), then the counted run.
      key_flag=(); [[ $keys == on ]] && key_flag=(--keys)
      loadgen "$secret" --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" \
        publish-count --groups "$groups" --events 1000 --in-flight 8 "${key_flag[@]}" --label warm-up >/dev/null
      redis-cli -p "$redis_port" config resetstat >/dev/null
      before=$(cpu_ticks "$redis_pid")
      loadgen "$secret" --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" --server-pid "$node_pid" \
        publish-count --groups "$groups" --events "$stats_events" --in-flight 8 "${key_flag[@]}" \
        --label "commandstats keys-$keys round-$round" >"$out/last.json"
      cat "$out/last.json" >>"$runs"
      after=$(cpu_ticks "$redis_pid")
      evalsha=$(redis-cli -p "$redis_port" info commandstats | tr -d '\r' | awk -F: '$1 == "cmdstat_evalsha" { print $2 }')
      python3 - "$keys" "$round" "$evalsha" "$before" "$after" "$(getconf CLK_TCK)" "$out/last.json" <<'PY' | tee -a "$runs"
import json, sys
keys, round_, evalsha, before, after, tck, last = sys.argv[1:]
stats = dict(kv.split("=") for kv in evalsha.split(","))
run = json.load(open(last))
print(json.dumps({"scenario": "commandstats", "keys": keys, "round": int(round_),
    "evalsha_calls": int(stats["calls"]), "evalsha_usec": int(stats["usec"]),
    "usec_per_call": float(stats["usec_per_call"]),
    "redis_cpu_secs": (int(after) - int(before)) / int(tck),
    "node_cpu_secs": run["server_cpu_secs"], "events": run["accepted"],
    "events_per_sec": run["events_per_sec"]}))
PY
      stop_all
    done
  done
  table=$(python3 - "$runs" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"scenario": "commandstats"' in l]
def med(v):
    v = sorted(v); n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
def cell(v, f):
    return f(med(v)) + (f" ({f(min(v))}–{f(max(v))})" if len(v) > 1 else "")
print("| key | rounds | EVALSHA calls | usec per EVALSHA, median (min–max) | redis-server CPU µs per event | node CPU µs per event | events/s |")
print("|---|---|---|---|---|---|---|")
meds = {}
for keys in ("off", "on"):
    rs = [r for r in rows if r["keys"] == keys]
    if not rs:
        continue
    usec = [r["usec_per_call"] for r in rs]
    rcpu = [r["redis_cpu_secs"] / r["events"] * 1e6 for r in rs]
    ncpu = [r["node_cpu_secs"] / r["events"] * 1e6 for r in rs]
    meds[keys] = med(usec)
    print(f"| {'one per event' if keys == 'on' else 'none'} | {len(rs)} | {cell([r['evalsha_calls'] for r in rs], lambda v: f'{v:,.0f}')} | "
          f"{cell(usec, lambda v: f'{v:.2f}')} | {cell(rcpu, lambda v: f'{v:.1f}')} | {cell(ncpu, lambda v: f'{v:.1f}')} | "
          f"{cell([r['events_per_sec'] for r in rs], lambda v: f'{v:,.0f}')} |")
if len(meds) == 2:
    print()
    print(f"A key adds {meds['on'] - meds['off']:+.2f} µs per EVALSHA ({(meds['on'] / meds['off'] - 1) * 100:+.0f} %), medians.")
PY
)
  summary+=("redis-server's time per publish script call ($stats_events Publish calls, 8 in flight, one node on Redis, native; $rounds rounds taking turns):" "" "$table" "")
fi

if [[ " $parts " == *" memory "* ]]; then
  for history in off on; do
    for keys in off on; do
      echo "memory: Redis, history $history, keys $keys" >&2
      start_redis
      start_node "" --redis-url "redis://127.0.0.1:$redis_port/" --history "$history"
      key_flag=(); [[ $keys == on ]] && key_flag=(--keys)
      # One event first, so the script is loaded and the sequence started before "before".
      loadgen "$secret" --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" \
        publish-count --groups "$groups" --events 10 --label warm-up >/dev/null
      used_before=$(info_field "$redis_port" memory used_memory)
      keys_before=$(redis-cli -p "$redis_port" dbsize)
      loadgen "$secret" --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" \
        publish-count --groups "$groups" --events "$memory_events" --batch 500 --in-flight 2 "${key_flag[@]}" \
        --label "memory redis history-$history keys-$keys" >/dev/null
      used_after=$(info_field "$redis_port" memory used_memory)
      keys_after=$(redis-cli -p "$redis_port" dbsize)
      one=$(redis-cli -p "$redis_port" --scan --pattern '*:h:i:*' | head -1 || true)
      usage=null ttl=null
      if [[ -n $one ]]; then
        usage=$(redis-cli -p "$redis_port" memory usage "$one" samples 0)
        ttl=$(redis-cli -p "$redis_port" pttl "$one")
        echo "one key: $one, MEMORY USAGE $usage, PTTL $ttl" >&2
      fi
      printf '{"scenario":"redis-memory","history":"%s","keys":"%s","events":%s,"used_before":%s,"used_after":%s,"dbsize_before":%s,"dbsize_after":%s,"memory_usage_of_a_key":%s,"key_name_bytes":%s}\n' \
        "$history" "$keys" "$memory_events" "$used_before" "$used_after" "$keys_before" "$keys_after" "$usage" "${#one}" | tee -a "$runs"
      stop_all
    done
  done
  for keys in off on; do
    echo "memory: one node, in-memory bus, keys $keys" >&2
    start_node ""
    key_flag=(); [[ $keys == on ]] && key_flag=(--keys)
    loadgen "$secret" --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" \
      publish-count --groups "$groups" --events 10 --label warm-up >/dev/null
    rss_before=$(rss_kib "$node_pid")
    loadgen "$secret" --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" \
      publish-count --groups "$groups" --events "$memory_events" --batch 500 --in-flight 2 "${key_flag[@]}" \
      --label "memory node keys-$keys" >/dev/null
    rss_after=$(rss_kib "$node_pid")
    printf '{"scenario":"node-memory","keys":"%s","events":%s,"rss_kib_before":%s,"rss_kib_after":%s}\n' \
      "$keys" "$memory_events" "$rss_before" "$rss_after" | tee -a "$runs"
    stop_all
  done
  table=$(python3 - "$runs" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
redis = {(r["history"], r["keys"]): r for r in rows if r.get("scenario") == "redis-memory"}
node = {r["keys"]: r for r in rows if r.get("scenario") == "node-memory"}
print("| where | history | key | events | used_memory before → after | growth per event | keys in the database (DBSIZE) after | MEMORY USAGE of one key |")
print("|---|---|---|---|---|---|---|---|")
for (history, keys), r in sorted(redis.items()):
    grow = (r["used_after"] - r["used_before"]) / r["events"]
    usage = "–" if r["memory_usage_of_a_key"] is None else f"{r['memory_usage_of_a_key']} bytes (name {r['key_name_bytes']} bytes)"
    print(f"| redis-server | {history} | {'one per event' if keys == 'on' else 'none'} | {r['events']:,} | "
          f"{r['used_before']:,} → {r['used_after']:,} | {grow:.1f} bytes | {r['dbsize_after']:,} | {usage} |")
for keys, r in sorted(node.items()):
    grow = (r["rss_kib_after"] - r["rss_kib_before"]) * 1024 / r["events"]
    print(f"| one node's RSS (in-memory bus) | on | {'one per event' if keys == 'on' else 'none'} | {r['events']:,} | "
          f"{r['rss_kib_before']:,} KiB → {r['rss_kib_after']:,} KiB | {grow:.1f} bytes | – | – |")
print()
for history in ("off", "on"):
    if (history, "on") in redis and (history, "off") in redis:
        on, off = redis[(history, "on")], redis[(history, "off")]
        per = ((on["used_after"] - on["used_before"]) - (off["used_after"] - off["used_before"])) / on["events"]
        print(f"- Redis, history {history}: {per:.1f} bytes of used_memory per key (with keys minus without).")
if "on" in node and "off" in node:
    per = ((node["on"]["rss_kib_after"] - node["on"]["rss_kib_before"]) - (node["off"]["rss_kib_after"] - node["off"]["rss_kib_before"])) * 1024 / node["on"]["events"]
    print(f"- One node, in memory: {per:.1f} bytes of RSS per key (with keys minus without; RSS moves in pages and with the allocator's caches).")
PY
)
  summary+=("Memory per key ($memory_events events with a key each, PublishBatch of 500, $groups groups of one socket (0: one group with none)):" "" "$table" "")
fi

{
  echo "Idempotency keys, counted on $(date -u +%Y-%m-%d) at commit $commit:"
  echo
  printf '%s\n' "${summary[@]}"
} | tee target/bench/idempotency.md
