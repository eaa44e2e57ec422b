#!/usr/bin/env bash
# Serves the Django Channels peer as Baserow's production does: uvicorn (Baserow runs it
# as gunicorn's uvicorn worker; here one process, like daphne in run.sh) with the
# `websockets` protocol implementation, which accepts permessage-deflate with context
# takeover (uvicorn's default --ws-per-message-deflate true: zlib's level 6, a 15-bit
# window, memLevel 8). On 127.0.0.1:PORT, in the foreground; needs JWT_SECRET and
# REDIS_URL, and the venv made by setup.sh. Execs uvicorn, so its pid is the server's.
set -euo pipefail
port="${1:?usage: run-uvicorn.sh PORT}"
: "${JWT_SECRET:?JWT_SECRET must be set}"
: "${REDIS_URL:?REDIS_URL must be set, e.g. redis://127.0.0.1:6391/0}"
here="$(cd "$(dirname "$0")" && pwd)"
venv="$(cd "$here/../.." && pwd)/.venv-django"
if [[ ! -x "$venv/bin/uvicorn" ]]; then
  echo "run-uvicorn.sh: no uvicorn in $venv; run $here/setup.sh first" >&2
  exit 1
fi
export JWT_SECRET REDIS_URL DJANGO_SETTINGS_MODULE=benchpeer.settings
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
want=20000 soft=$(ulimit -Sn) hard=$(ulimit -Hn)
if [[ $hard != unlimited ]] && ((hard < want)); then want=$hard; fi
if [[ $soft != unlimited ]] && ((soft < want)); then ulimit -Sn "$want"; fi
# --backlog 1024 as channelgate's; warnings and errors only, no access log.
exec "$venv/bin/uvicorn" benchpeer.asgi:application --host 127.0.0.1 --port "$port" \
  --ws websockets --ws-per-message-deflate true --backlog 1024 --log-level warning --no-access-log
