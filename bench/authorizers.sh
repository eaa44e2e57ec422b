#!/usr/bin/env bash
# What a subscribe costs with each authorizer kind: one socket subscribes to 2,000
# different tables one after another (no cache hits) against three nodes side by side,
# static, HTTP and gRPC, the two backends being an allow-all server on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p channelgate -p channelgate-bench
secret=bench-secret
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
./target/release/loadgen --jwt-secret x serve-authorizer --http-addr 127.0.0.1:18001 --grpc-addr 127.0.0.1:18002 &
pids+=($!)
start_node() { # name port authorizer
  ./target/release/channelgate --dev --jwt-secret "$secret" --ws-addr "127.0.0.1:$2" \
    --grpc-addr "127.0.0.1:$(($2 + 1000))" --authorizer "$3" >/dev/null 2>&1 &
  pids+=($!)
}
start_node static 18100 static
start_node http 18200 http://127.0.0.1:18001/authorize
start_node grpc 18300 grpc://127.0.0.1:18002
sleep 0.5
for round in 1 2 3; do
  for kind in static:18100 http:18200 grpc:18300; do
    port=${kind#*:}
    printf '%-7s round %s: ' "${kind%%:*}" "$round"
    ./target/release/loadgen --ws-addr "127.0.0.1:$port" --grpc-addr "127.0.0.1:$((port + 1000))" \
      --jwt-secret "$secret" subscribe --count 2000
  done
done
