#!/usr/bin/env bash
# Starts a local cluster for trying channelgate: two nodes that share one JWT secret, so a
# token works on both, and the Redis they exchange events through: one redis-server on
# REDIS_PORT (6390) by default, or with REDIS_CLUSTER=1 a Redis Cluster of three primaries
# with one replica each on REDIS_CLUSTER_BASE..+5 (7001..7006, scripts/redis-cluster.sh).
# Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
redis_port=${REDIS_PORT:-6390}
redis_cluster=${REDIS_CLUSTER:-0}
cluster_base=${REDIS_CLUSTER_BASE:-7001}
secret=${CHANNELGATE_JWT_SECRET:-cluster-dev-secret}
bin=./target/release/channelgate
logs=target/cluster
mkdir -p "$logs"
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "$redis_cluster" = 1 ]; then scripts/redis-cluster.sh stop "$logs/redis-cluster"; fi
}
trap cleanup EXIT INT TERM

if [ "$redis_cluster" = 1 ]; then
  "$bin" --help 2>&1 | grep -- --redis-cluster-nodes >/dev/null || {
    echo "$bin has no --redis-cluster-nodes: rebuild it (make cluster does)" >&2
    exit 1
  }
  # A cluster left by a run that was killed outright is stopped first.
  scripts/redis-cluster.sh stop "$logs/redis-cluster"
  nodes=$(scripts/redis-cluster.sh start "$logs/redis-cluster" "$cluster_base")
  redis_args=(--redis-cluster-nodes "$nodes")
  redis_desc="Redis Cluster $nodes (3 primaries, 3 replicas)"
else
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  pids+=($!)
  sleep 0.3
  redis_args=(--redis-url "redis://127.0.0.1:$redis_port/")
  redis_desc="redis on 127.0.0.1:$redis_port"
fi
for n in 1 2; do
  "$bin" --dev --presence on --jwt-secret "$secret" --node-id "node-$n" \
    "${redis_args[@]}" \
    --ws-addr "127.0.0.1:808$n" --grpc-addr "127.0.0.1:5006$n" \
    >"$logs/node-$n.out" 2>&1 &
  pids+=($!)
done
sleep 1
token=$(grep -A1 "Sample token" "$logs/node-1.out" | tail -1 | tr -d ' ')
cat <<EOF2
Cluster up: $redis_desc, node-1 and node-2.
  ws://127.0.0.1:8081/ws/core/?jwt_token=$token
  ws://127.0.0.1:8082/ws/core/?jwt_token=$token
Subscribe on either with {"page":"table","table_id":1}, then publish on node-1:
  grpcurl -plaintext -d '{"group":"table-1","payload":"{\"type\":\"hello\"}"}' 127.0.0.1:50061 channelgate.v1.Gateway/Publish
  grpcurl -plaintext 127.0.0.1:50061 channelgate.v1.Gateway/Info
Logs: $logs/node-1.out and node-2.out. Ctrl-C stops all.
EOF2
wait
