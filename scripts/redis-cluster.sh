#!/usr/bin/env bash
# A local Redis Cluster: three primaries with one replica each, redis-server processes on
# 127.0.0.1 ports BASE..BASE+5 (default 7001; cluster bus on port+10000), each with its
# own directory under DIR for nodes.conf and its log.
#
#   scripts/redis-cluster.sh start DIR [BASE]   prints the node list: 127.0.0.1:7001,...
#   scripts/redis-cluster.sh stop DIR           stops the servers listed in DIR/pids
set -euo pipefail

usage() {
  echo "usage: $0 start DIR [BASE] | stop DIR" >&2
  exit 2
}
[ $# -ge 2 ] || usage
action=$1
dir=$2

# Whether a pid runs (a zombie left for a slow-reaping init counts as gone).
running() {
  local state=R
  kill -0 "$1" 2>/dev/null || return 1
  [ ! -r "/proc/$1/stat" ] || read -r _ _ state _ <"/proc/$1/stat" 2>/dev/null || true
  [ "$state" != Z ]
}

stop() {
  [ -f "$dir/pids" ] || return 0
  local pids="" pid i comm
  # A pid left by a run long gone may belong to another program now: redis-server only.
  for pid in $(cat "$dir/pids"); do
    comm=redis-server
    [ ! -r "/proc/$pid/comm" ] || comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [ "$comm" != redis-server ] || pids+=" $pid"
  done
  # shellcheck disable=SC2086
  kill $pids 2>/dev/null || true
  for pid in $pids; do
    for ((i = 0; i < 100; i++)); do
      running "$pid" || break
      sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -f "$dir/pids"
}

# Polls `$@` every 50 ms for up to 20 s; fails with $what after that.
wait_for() {
  local what=$1 i
  shift
  for ((i = 0; i < 400; i++)); do
    if "$@"; then return 0; fi
    sleep 0.05
  done
  echo "redis-cluster.sh: timed out waiting for $what (logs in $dir/PORT/redis.log)" >&2
  return 1
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
answers() { [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ]; }
cluster_ok() { redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }

case $action in
start)
  base=${3:-7001}
  [[ $base =~ ^[0-9]+$ ]] && ((base >= 1024 && base + 5 + 10000 <= 65535)) || {
    echo "BASE must be a port from 1024 with BASE+5+10000 below 65536" >&2
    exit 2
  }
  ports=$(seq "$base" $((base + 5)))
  [ ! -s "$dir/pids" ] || {
    echo "$dir/pids exists: run '$0 stop $dir' first" >&2
    exit 1
  }
  for port in $ports; do
    port_free "$port" && port_free $((port + 10000)) || {
      echo "port $port or $((port + 10000)) is in use" >&2
      exit 1
    }
  done
  mkdir -p "$dir"
  # Whatever fails from here stops the servers started so far.
  trap 'stop' EXIT
  nodes=()
  for port in $ports; do
    mkdir -p "$dir/$port"
    rm -f "$dir/$port/nodes.conf"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir/$port" \
      --cluster-enabled yes --cluster-config-file nodes.conf \
      --save "" --appendonly no --cluster-node-timeout 1000 --repl-diskless-sync-delay 0 \
      </dev/null >"$dir/$port/redis.log" 2>&1 &
    echo $! >>"$dir/pids"
    nodes+=("127.0.0.1:$port")
  done
  for port in $ports; do wait_for "redis-server on $port" answers "$port"; done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes \
    >"$dir/create.log" 2>&1 || {
    cat "$dir/create.log" >&2
    exit 1
  }
  for port in $ports; do wait_for "cluster_state:ok on $port" cluster_ok "$port"; done
  trap - EXIT
  (
    IFS=,
    echo "${nodes[*]}"
  )
  ;;
stop) stop ;;
*) usage ;;
esac
