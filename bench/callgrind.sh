#!/usr/bin/env bash
# Instructions and system calls per delivery, channelgate (history off and on) against the
# raw broadcaster: counts that a noisy machine cannot move, so a change can be judged
# without rounds.
#
# Each server runs under callgrind with one tokio worker, the load generator natively. Every
# variant gets the same S1-shaped run (`loadgen fanout`): SOCKETS sockets in NGROUPS groups
# (1,000 in 10 by default: 100 per group, as in S1), events published round robin over the
# groups in bursts (BURSTS, each burst's events all at once) and the next burst only once
# the last one reached all its sockets. Bursts of 1 are an unhurried delivery, one event at
# a time, where nothing batches; bursts of 100 (10 events per group) queue ten frames on
# every socket at once, as a server that falls behind under load sees them. channelgate is
# published to over gRPC, the raw broadcaster over its publisher WebSocket: each system's
# own publish path counts. Each run is made with two event counts (EVENTS) and the
# difference is divided by the extra deliveries, so start-up, connects and subscribes cancel
# out. Callgrind counts user-space instructions only: the kernel's side of the system calls
# (writes, epoll) is not in them, so the calls per delivery are counted too
# (--collect-systime). channelgate's pings are pushed past the run (--ping-interval-ms
# 3600000), or the longer run would count more of them. Two to four minutes a variant. The
# table goes to standard output and to target/bench/callgrind.md, which the next `make bench`
# quotes in BENCHMARKS.md.
#
#   bash bench/callgrind.sh   # SOCKETS=1000 NGROUPS=10 EVENTS="200 1000" BURSTS="1 100"
#                             # VARIANTS="channelgate-off channelgate-on raw"
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
sockets=${SOCKETS:-1000}
groups=${NGROUPS:-10}
read -r low high <<<"${EVENTS:-200 1000}"
bursts=${BURSTS:-"1 100"}
variants=${VARIANTS:-"channelgate-off channelgate-on raw"}
secret=bench-secret
out=target/bench/callgrind
mkdir -p "$out"
ulimit -n 20000
cargo build --release -q -p channelgate -p channelgate-bench
# What was counted, for the table.
commit=$(commit_label)

pid=
stop() { # the server, so that callgrind writes its counts
  stop_pid "$pid"
  pid=
}
trap stop EXIT

# Instructions and system calls the server made in one run, into $total and $calls:
# variant, events, burst.
total= calls=
instructions() {
  local variant=$1 events=$2 burst=$3 ws grpc file system
  ws=$(free_port); grpc=$(free_port)
  file="$out/$variant-$burst-$events.out"
  rm -f "$file"
  case $variant in
    channelgate-on|channelgate-off)
      system=channelgate
      valgrind --tool=callgrind --collect-systime=yes --callgrind-out-file="$file" \
        ./target/release/channelgate --dev --jwt-secret "$secret" --workers 1 \
        --history "${variant#channelgate-}" --ping-interval-ms 3600000 --handshake-timeout-ms 120000 \
        --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" >"$out/server.log" 2>&1 &
      pid=$!
      wait_port "$ws" 60; wait_port "$grpc" 60 ;;
    raw)
      system=raw
      TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --collect-systime=yes --callgrind-out-file="$file" \
        ./target/release/rawcast "127.0.0.1:$ws" >"$out/server.log" 2>&1 &
      pid=$!
      wait_port "$ws" 60 ;;
    *) echo "unknown variant $variant (channelgate-off, channelgate-on, raw)" >&2; return 1 ;;
  esac
  timeout 900 ./target/release/loadgen --system "$system" --ws-addr "127.0.0.1:$ws" \
    --grpc-addr "127.0.0.1:$grpc" --jwt-secret "$secret" \
    fanout --sockets "$sockets" --groups "$groups" --events "$events" --burst "$burst" >"$out/loadgen.log" 2>&1 \
    || { echo "$variant, $events events: the load generator failed:" >&2; cat "$out/loadgen.log" >&2; stop; return 1; }
  stop
  # events: Ir sysCount sysTime; summary: the totals in that order.
  read -r total calls < <(awk '/^summary:/ { print $2, $3 }' "$file")
  [[ -n $total && -n $calls ]] || { echo "$variant, $events events: no count in $file" >&2; return 1; }
}

name() {
  case $1 in
    channelgate-off) echo "channelgate, history off" ;;
    channelgate-on) echo "channelgate, history on (its default)" ;;
    raw) echo "raw broadcaster (tokio + tungstenite)" ;;
  esac
}
# Per delivery: (b - a) / ((high - low) * members), to two decimals or whole.
per() { python3 -c 'import sys
a, b, s, g, l, h, d = map(int, sys.argv[1:])
v = (b - a) / ((h - l) * (s // g))
print(f"{v:.{d}f}")' "$@"; }

declare -A ir sc
header="| system |" rule="|---|"
for burst in $bursts; do
  what="one event at a time"; if (( burst > 1 )); then what="bursts of $burst"; fi
  header+=" instructions per delivery, $what | system calls per delivery, $what |"
  rule+="---|---|"
done
rows=()
for variant in $variants; do
  row="| $(name "$variant") |"
  for burst in $bursts; do
    echo "counting $variant, bursts of $burst ($low and $high events)" >&2
    instructions "$variant" "$low" "$burst"; a=$total; a_calls=$calls
    instructions "$variant" "$high" "$burst"; b=$total; b_calls=$calls
    ir[$variant,$burst]=$(per "$a" "$b" "$sockets" "$groups" "$low" "$high" 0)
    sc[$variant,$burst]=$(per "$a_calls" "$b_calls" "$sockets" "$groups" "$low" "$high" 2)
    row+=" $(python3 -c 'import sys; print(f"{int(sys.argv[1]):,}")' "${ir[$variant,$burst]}") | ${sc[$variant,$burst]} |"
  done
  rows+=("$row")
done

echo
{
  echo "Instructions and system calls per delivery ($sockets sockets in $groups groups, $low and"
  echo "$high events, one worker), counted on $(date -u +%Y-%m-%d) at commit $commit:"
  echo
  echo "$header"
  echo "$rule"
  printf '%s\n' "${rows[@]}"
  echo
  for burst in $bursts; do
    what="one event at a time"; if (( burst > 1 )); then what="bursts of $burst"; fi
    for variant in channelgate-on channelgate-off; do
      if [[ -n ${ir[raw,$burst]:-} && -n ${ir[$variant,$burst]:-} ]]; then
        python3 -c 'import sys; c, r = map(int, sys.argv[3:]); print(f"- {sys.argv[1]} / raw broadcaster, {sys.argv[2]}: {c / r:.2f}x instructions")' \
          "$(name "$variant")" "$what" "${ir[$variant,$burst]}" "${ir[raw,$burst]}"
      fi
    done
  done
} | tee target/bench/callgrind.md
