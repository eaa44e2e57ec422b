#!/usr/bin/env bash
# Serves the sockudo peer on 127.0.0.1:PORT in the foreground, WebSocket and HTTP API on the
# one port, with config.json beside this script. The worker count is the caller's
# TOKIO_WORKER_THREADS (sockudo's runtime is a plain #[tokio::main]). BIN is the binary
# setup.sh printed. The script execs sockudo, so its pid is the server's.
set -euo pipefail
port="${1:?usage: run.sh PORT BIN}"
bin="${2:?usage: run.sh PORT BIN}"
here="$(cd "$(dirname "$0")" && pwd)"
# sockudo also reads config/config.toml or config/config.json under its working directory
# first; from here there is none. An explicit --config that fails to load only logs an error
# and keeps the defaults (rate limiter on, no app), so the file is checked to be there.
if [[ ! -f $here/config.json ]]; then
  echo "run.sh: no $here/config.json" >&2
  exit 1
fi
cd "$here"
# PORT and HOST from the environment outrank the file's.
exec env PORT="$port" HOST=127.0.0.1 "$bin" --config "$here/config.json"
