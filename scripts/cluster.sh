#!/usr/bin/env bash
# Starts a local cluster for trying channelgate: one redis-server and two nodes that share
# it, with one JWT secret so a token works on both. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
redis_port=${REDIS_PORT:-6390}
secret=${CHANNELGATE_JWT_SECRET:-cluster-dev-secret}
bin=./target/release/channelgate
logs=target/cluster
mkdir -p "$logs"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT INT TERM

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
pids+=($!)
sleep 0.3
for n in 1 2; do
  "$bin" --dev --presence on --jwt-secret "$secret" --node-id "node-$n" \
    --redis-url "redis://127.0.0.1:$redis_port/" \
    --ws-addr "127.0.0.1:808$n" --grpc-addr "127.0.0.1:5006$n" \
    >"$logs/node-$n.out" 2>&1 &
  pids+=($!)
done
sleep 1
token=$(grep -A1 "Sample token" "$logs/node-1.out" | tail -1 | tr -d ' ')
cat <<EOF2
Cluster up: redis on 127.0.0.1:$redis_port, node-1 and node-2.
  ws://127.0.0.1:8081/ws/core/?jwt_token=$token
  ws://127.0.0.1:8082/ws/core/?jwt_token=$token
Subscribe on either with {"page":"table","table_id":1}, then publish on node-1:
  grpcurl -plaintext -d '{"group":"table-1","payload":"{\"type\":\"hello\"}"}' 127.0.0.1:50061 channelgate.v1.Gateway/Publish
  grpcurl -plaintext 127.0.0.1:50061 channelgate.v1.Gateway/Info
Logs: $logs/node-1.out and node-2.out. Ctrl-C stops all.
EOF2
wait
