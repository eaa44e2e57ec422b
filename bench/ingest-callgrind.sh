#!/usr/bin/env bash
# Instructions and system calls per Publish call: what one unary gRPC Publish costs the
# node, in counts that a noisy machine cannot move (S6 in bench/run.sh measures Publish/s
# per CPU-second instead).
#
# One node (in-memory bus, history on: the defaults; `--dev`, so no API key and the
# console's list of recent publishes on) with one tokio worker under valgrind's callgrind,
# the load generator natively: `loadgen publish-count` makes EVENTS (two counts) Publish
# calls one at a time on one HTTP/2 connection, each awaited, to NGROUPS groups with one
# socket each (0, the default: one group nobody listens to, so only the publish path
# counts). Per Publish = (total at the higher count - total at the lower) / the extra calls,
# so start-up and connects cancel out. Callgrind counts user-space instructions only; the
# system calls per Publish are counted too (--collect-systime), the kernel's side of them is
# not in the instructions. REPEATS runs of each count (callgrind repeats itself to within a
# few hundred instructions per call). API_KEY starts the node with `--api-key` and sends
# it with every call (production runs with one); FLAGS adds channelgate flags.
#
#   bash bench/ingest-callgrind.sh   # EVENTS="1000 3000" NGROUPS=0 REPEATS=1 API_KEY= FLAGS=
#   BIN=path/to/channelgate BUILD=0 bash bench/ingest-callgrind.sh   # another build
#
# The callgrind files stay in target/bench/ingest-callgrind/ for callgrind_annotate
# (`--inclusive=yes`); the figure goes to standard output.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
read -r low high <<<"${EVENTS:-1000 3000}"
groups=${NGROUPS:-0}
repeats=${REPEATS:-1}
bin=${BIN:-./target/release/channelgate}
read -ra flags <<<"${FLAGS:-}"
key_args=()
if [[ -n ${API_KEY:-} ]]; then
  flags+=(--api-key "$API_KEY")
  key_args=(--api-key "$API_KEY")
fi
secret=bench-secret
out=target/bench/ingest-callgrind
mkdir -p "$out"
ulimit -n 20000
if [[ ${BUILD:-1} != 0 ]]; then cargo build --release -q -p channelgate -p channelgate-bench; fi
commit=$(commit_label)

pid=
stop() { # the server, so that callgrind writes its counts
  stop_pid "$pid"
  pid=
}
trap stop EXIT

# The node's instructions and system calls over one run of `events` calls, into $total
# and $calls: events, run number.
total= calls= clocks=
count() {
  local events=$1 run=$2 ws grpc file
  ws=$(free_port); grpc=$(free_port)
  file="$out/publish-$events-$run.out"
  rm -f "$file"
  valgrind --tool=callgrind --collect-systime=yes --callgrind-out-file="$file" \
    "$bin" --dev --jwt-secret "$secret" --workers 1 --ping-interval-ms 3600000 \
    --handshake-timeout-ms 120000 --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" \
    "${flags[@]}" >"$out/node.log" 2>&1 &
  pid=$!
  wait_port "$ws" 60; wait_port "$grpc" 60
  timeout 900 ./target/release/loadgen --system channelgate --ws-addr "127.0.0.1:$ws" \
    --grpc-addr "127.0.0.1:$grpc" --jwt-secret "$secret" \
    publish-count --groups "$groups" --events "$events" "${key_args[@]}" >"$out/loadgen.log" 2>&1 \
    || { echo "$events calls: the load generator failed:" >&2; cat "$out/loadgen.log" >&2; stop; return 1; }
  stop
  # events: Ir sysCount sysTime; summary: the totals in that order.
  read -r total calls < <(awk '/^summary:/ { print $2, $3 }' "$file")
  [[ -n $total && -n $calls ]] || { echo "$events calls: no count in $file" >&2; return 1; }
  # Under valgrind clock_gettime is a system call; natively it is not (the vDSO answers
  # it), so it is counted apart.
  clocks=$(callgrind_annotate --sort=sysCount --threshold=100 --auto=no "$file" \
    | sed -n 's/([^)]*)//g; s/,//g; /clock_gettime/p' | awk '{ n += $2 } END { print n + 0 }')
}

per() { python3 -c 'import sys; a, b, l, h = map(int, sys.argv[1:5]); print(f"{(b - a) / (h - l):.{sys.argv[5]}f}")' "$@"; }

echo "Publish calls one at a time, $low and $high calls, $groups socket group(s)," \
  "${API_KEY:+an API key, }$bin, commit $commit:"
for run in $(seq "$repeats"); do
  count "$low" "$run"; a=$total; a_calls=$((calls - clocks)); a_clocks=$clocks
  count "$high" "$run"; b=$total; b_calls=$((calls - clocks)); b_clocks=$clocks
  echo "run $run: $(per "$a" "$b" "$low" "$high" 0) instructions per Publish," \
    "$(per "$a_calls" "$b_calls" "$low" "$high" 2) system calls per Publish" \
    "(and $(per "$a_clocks" "$b_clocks" "$low" "$high" 2) clock_gettime)"
done
