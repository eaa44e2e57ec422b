#!/usr/bin/env bash
# What the console costs a node, measured side by side: two release nodes with the same
# flags, one with the console off and one with it on (--dev), each holding $SOCKETS
# anonymous sockets over $NGROUPS groups. Prints the RSS and CPU of both while idle, then
# of the console node while a headless Chromium keeps its console open for $OPEN seconds
# (the page asks for api/state every 2 s), and what one api/state answer weighs and takes.
# Needs a release build (cargo build --release), node 20+ (its WebSocket opens the
# sockets) and chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/channelgate}
SOCKETS=${SOCKETS:-2000}
NGROUPS=${NGROUPS:-500}
OPEN=${OPEN:-60}
IDLE=${IDLE:-30}
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
metric() { curl -s "http://$1/metrics" | awk -v name="$2" '$1 == name {print $2}'; }
hz=$(getconf CLK_TCK)

cat > "$work/sockets.mjs" <<'JS'
const [addr, n, groups] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
let open = 0;
for (let i = 0; i < n; i++) {
  const ws = new WebSocket(`ws://${addr}/ws/core/?jwt_token=anonymous`);
  ws.onopen = () => {
    ws.send(JSON.stringify({ page: "view", slug: `v${i % groups}`, token: null }));
    if (++open === n) console.log("open");
  };
  ws.onerror = () => { console.error("a socket failed"); process.exit(1); };
  if (i % 100 === 99) await new Promise((r) => setTimeout(r, 20));
}
setInterval(() => {}, 1 << 30);
JS

start_node() { # name, extra flags...
  local name=$1; shift
  local ws grpc
  ws=127.0.0.1:$(port); grpc=127.0.0.1:$(port)
  "$BIN" --ws-addr "$ws" --grpc-addr "$grpc" --jwt-secret cost-secret --api-key cost-key \
    --node-id "$name" "$@" >/dev/null 2>&1 &
  pids+=($!)
  eval "${name}_pid=$! ${name}_ws=$ws"
  until curl -sf "http://$ws/readyz" >/dev/null; do sleep 0.1; done
  node --experimental-websocket --no-warnings "$work/sockets.mjs" "$ws" "$SOCKETS" "$NGROUPS" \
    > "$work/$name.sockets" &
  pids+=($!)
  until grep -q open "$work/$name.sockets"; do sleep 0.2; done
}

start_node off
start_node on --dev
sleep 5
echo "## console cost: $SOCKETS sockets over $NGROUPS groups per node"
echo
echo "| node | phase | RSS KiB | CPU ms/s | console requests |"
echo "|---|---|---|---|---|"
c_off=$(cpu_ticks "$off_pid"); c_on=$(cpu_ticks "$on_pid")
sleep "$IDLE"
for name in off on; do
  pid_var=${name}_pid; c_var=c_$name
  pid=${!pid_var}
  ms=$(( ($(cpu_ticks "$pid") - ${!c_var}) * 1000 / hz / IDLE ))
  echo "| console $name | idle ${IDLE} s | $(rss_kib "$pid") | $ms | 0 |"
done

requests_before=$(metric "$on_ws" channelgate_console_requests_total)
c_on=$(cpu_ticks "$on_pid")
chromium --headless --no-sandbox --disable-gpu --no-first-run --remote-debugging-port=0 \
  --user-data-dir="$work/profile" "http://$on_ws/console/" >/dev/null 2>&1 &
browser=$!
pids+=($browser)
sleep "$OPEN"
ms=$(( ($(cpu_ticks "$on_pid") - c_on) * 1000 / hz / OPEN ))
requests=$(( $(metric "$on_ws" channelgate_console_requests_total) - requests_before ))
echo "| console on | open in Chromium ${OPEN} s | $(rss_kib "$on_pid") | $ms | $requests |"
kill "$browser"; wait "$browser" 2>/dev/null || true
sleep 10
echo "| console on | 10 s after closing | $(rss_kib "$on_pid") | | |"
echo
bytes=$(curl -s "http://$on_ws/console/api/state" | wc -c)
c_on=$(cpu_ticks "$on_pid")
total=$(for _ in $(seq 300); do curl -s -o /dev/null -w '%{time_total}\n' "http://$on_ws/console/api/state"; done |
  awk '{s += $1} END {printf "%.2f", s * 1000 / NR}')
cpu=$(awk -v t=$(( $(cpu_ticks "$on_pid") - c_on )) -v hz="$hz" 'BEGIN {printf "%.2f", t * 1000 / hz / 300}')
page=$(for f in / console.js console.css api/setup; do curl -s "http://$on_ws/console/$f"; done | wc -c)
echo "api/state: $bytes bytes, $total ms and $cpu ms of the node's CPU per answer (300 in a row);"
echo "the page, script, style and setup: $page bytes"
