#!/usr/bin/env bash
# Instructions per delivery, history on against off: counts that a noisy machine cannot
# move. The node runs under callgrind, the load generator natively; each variant runs with
# two event counts and the difference is divided by the extra deliveries, so start-up,
# connects and subscribes cancel out.
#
#   bash bench/callgrind.sh            # SOCKETS=100 EVENTS="100 400"
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
sockets=${SOCKETS:-100}
read -r low high <<<"${EVENTS:-100 400}"
secret=bench-secret
out=target/bench/callgrind
mkdir -p "$out"
cargo build --release -q -p channelgate -p channelgate-bench

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 600); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

# Instructions the node executed for one run: history on|off, events.
instructions() {
  local history=$1 events=$2 ws grpc file pid
  ws=$(free_port); grpc=$(free_port)
  file="$out/history-$history-$events.out"
  valgrind --tool=callgrind --callgrind-out-file="$file" \
    ./target/release/channelgate --dev --jwt-secret "$secret" --history "$history" \
    --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" >"$out/node.log" 2>&1 &
  pid=$!
  wait_port "$ws"; wait_port "$grpc"
  ./target/release/loadgen --ws-addr "127.0.0.1:$ws" --grpc-addr "127.0.0.1:$grpc" \
    --jwt-secret "$secret" fanout --sockets "$sockets" --events "$events" --gap-ms 5 >"$out/loadgen.log"
  kill -INT "$pid"; wait "$pid" || true
  awk '/^summary:/ { print $2 }' "$file"
}

echo "| history | instructions per delivery | ($sockets sockets, $low and $high events) |"
echo "|---|---|---|"
for history in off on; do
  a=$(instructions "$history" "$low")
  b=$(instructions "$history" "$high")
  python3 -c "import sys; a,b,s,l,h=map(int,sys.argv[1:]); print(f'| $history | {(b-a)/((h-l)*s):,.0f} | |')" \
    "$a" "$b" "$sockets" "$low" "$high"
done
