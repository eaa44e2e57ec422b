#!/usr/bin/env bash
# Publish-to-receive latency across two nodes through Redis, against one node alone
# (in-memory bus), side by side: one subscriber, 2,000 events published one after another,
# three rounds each. The redis-server is this script's own, on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p channelgate -p channelgate-bench
secret=bench-secret
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
pids+=($!)
sleep 0.3
start_node() { # ws-port [extra flags]
  local port=$1; shift
  ./target/release/channelgate --dev --jwt-secret "$secret" --ws-addr "127.0.0.1:$port" \
    --grpc-addr "127.0.0.1:$((port + 1000))" "$@" >/dev/null 2>&1 &
  pids+=($!)
}
start_node 18400
start_node 18500 --redis-url "redis://127.0.0.1:$redis_port/" --node-id a
start_node 18600 --redis-url "redis://127.0.0.1:$redis_port/" --node-id b
sleep 1
run() { # label ws-port grpc-port
  printf '%-28s ' "$1"
  ./target/release/loadgen --ws-addr "127.0.0.1:$2" --grpc-addr "127.0.0.1:$3" \
    --jwt-secret "$secret" latency --events 2000
}
for round in 1 2 3; do
  run "one node, in-memory bus:" 18400 19400
  run "publish on A, socket on B:" 18600 19500
done
