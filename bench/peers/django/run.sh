#!/usr/bin/env bash
# Serves the Django Channels peer on 127.0.0.1:PORT, in the foreground, with SERVER:
# daphne (the default; no compression), or uvicorn as Baserow's production runs it
# (gunicorn's uvicorn worker there, one process here) with the `websockets` protocol
# implementation, which accepts permessage-deflate with context takeover (uvicorn's
# default --ws-per-message-deflate true: zlib's level 6, a 15-bit window, memLevel 8).
# Needs JWT_SECRET and REDIS_URL in the environment and the venv made by setup.sh.
# The script execs the server, so its pid is the server's: killing it stops it.
set -euo pipefail
port="${1:?usage: run.sh PORT [daphne|uvicorn]}"
server="${2:-daphne}"
: "${JWT_SECRET:?JWT_SECRET must be set}"
: "${REDIS_URL:?REDIS_URL must be set, e.g. redis://127.0.0.1:6391/0}"
here="$(cd "$(dirname "$0")" && pwd)"
venv="$(cd "$here/../.." && pwd)/.venv-django"
if [[ $server != daphne && $server != uvicorn ]]; then
  echo "run.sh: SERVER is daphne or uvicorn, not $server" >&2
  exit 2
fi
if [[ ! -x "$venv/bin/$server" ]]; then
  echo "run.sh: no $server in $venv; run $here/setup.sh first" >&2
  exit 1
fi
export JWT_SECRET REDIS_URL DJANGO_SETTINGS_MODULE=benchpeer.settings
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# One open file per socket: raise the soft limit to 20000 (bench/run.sh's, and the hard
# limit here) so 19,000 sockets plus the Redis pool fit; never lower it, and stay within
# the hard limit.
want=20000 soft=$(ulimit -Sn) hard=$(ulimit -Hn)
if [[ $hard != unlimited ]] && ((hard < want)); then want=$hard; fi
if [[ $soft != unlimited ]] && ((soft < want)); then ulimit -Sn "$want"; fi
if [[ $server == uvicorn ]]; then
  # --backlog 1024 as channelgate's; warnings and errors only, no access log.
  exec "$venv/bin/uvicorn" benchpeer.asgi:application --host 127.0.0.1 --port "$port" \
    --ws websockets --ws-per-message-deflate true --backlog 1024 --log-level warning \
    --no-access-log
fi
# Listen backlog 1024 as tokio's (channelgate's) default, instead of Twisted's 50, so a
# connection storm measures the server rather than SYN retries. -v 0: warnings and errors
# only, no access log line per connection.
#
# --websocket_connect_timeout 30 (default 5): seconds from TCP connect to the consumer's
# accept before daphne (autobahn's openHandshakeTimeout) aborts the socket with a reset.
# The one process's cyclic GC pauses grow with the sockets it holds, about 0.2 ms per
# socket per full collection (2 s at 10,000, 4-5 s at 17,000-19,000), and a handshake
# also waits behind the ones in flight; past 5 s, opening 19,000 sockets failed with
# "Connection reset by peer". The pauses still count in the measurements; only the
# deadline is longer.
exec "$venv/bin/daphne" -v 0 -e "tcp:port=$port:interface=127.0.0.1:backlog=1024" \
  --websocket_connect_timeout 30 benchpeer.asgi:application
