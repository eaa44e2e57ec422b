# What the bench's scripts share; each sources it from the repository's root.

# A TCP port nobody listens on now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits until something listens on PORT, at most SECS seconds [30] (a server under
# valgrind takes a while).
wait_port() { # port [secs]
  local tries=$(( ${2:-30} * 20 ))
  for _ in $(seq "$tries"); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 never opened" >&2
  return 1
}

# The commit being measured, for a table's heading.
commit_label() {
  local commit
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [[ -n $(git status --porcelain -- src bench Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    commit+=" with uncommitted changes"
  fi
  echo "$commit"
}

# Stops PID with SIGTERM (a server under callgrind then writes its counts; not SIGINT,
# which a background job of a script ignores unless it handles it itself), waiting at most
# a minute before SIGKILL.
stop_pid() { # pid
  local pid=$1
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "process $pid did not stop within a minute; killed" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# Starts an S1 server in the background on the cores CORES ("0" or "0-1") with WORKERS
# tokio workers and waits until it listens; its pid goes to $server_pid, its output to
# target/bench/raw.log or target/bench/channelgate.log. Further arguments are its flags.
start_rawcast() { # cores workers ws_port [flags...]
  local cores=$1 workers=$2 ws_port=$3
  shift 3
  TOKIO_WORKER_THREADS=$workers taskset -c "$cores" ./target/release/rawcast "127.0.0.1:$ws_port" "$@" \
    >target/bench/raw.log 2>&1 &
  server_pid=$!
  wait_port "$ws_port" 20
}

start_channelgate() { # binary cores workers ws_port grpc_port jwt_secret [flags...]
  local bin=$1 cores=$2 workers=$3 ws_port=$4 grpc_port=$5 secret=$6
  shift 6
  taskset -c "$cores" "$bin" --dev --jwt-secret "$secret" --workers "$workers" "$@" \
    --ws-addr "127.0.0.1:$ws_port" --grpc-addr "127.0.0.1:$grpc_port" >target/bench/channelgate.log 2>&1 &
  server_pid=$!
  wait_port "$grpc_port" 20
  wait_port "$ws_port" 20
}
