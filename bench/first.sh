#!/usr/bin/env bash
# First figures for one node: publish-to-receive latency with one subscriber, and one
# publish fanned out to 1,000 sockets. Builds release binaries, starts a node on free
# ports, runs the load generator against it, stops the node.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p channelgate -p channelgate-bench
secret=bench-secret
ws=127.0.0.1:18080
grpc=127.0.0.1:15051
ulimit -n 20000 2>/dev/null || true
./target/release/channelgate --dev --jwt-secret "$secret" --ws-addr "$ws" --grpc-addr "$grpc" \
  >/dev/null 2>&1 &
node=$!
trap 'kill $node 2>/dev/null || true' EXIT
sleep 0.5
loadgen=(./target/release/loadgen --ws-addr "$ws" --grpc-addr "$grpc" --jwt-secret "$secret")
"${loadgen[@]}" latency --events 2000
"${loadgen[@]}" fanout --sockets 1000 --groups 1 --events 100 --gap-ms 20
