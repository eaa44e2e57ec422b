#!/usr/bin/env bash
# Creates the Django Channels peer's virtualenv at bench/.venv-django and installs its
# packages (daphne; uvicorn with websockets for the variant served as Baserow's production
# is). Idempotent: a marker file records the requirements last installed, so a second run
# with the same requirements does nothing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="$root/bench/.venv-django"
marker="$venv/.installed"

requirements=(
  'django>=4.2,<6'
  'channels>=4,<5'
  'channels_redis>=4,<5'
  'daphne>=4,<5'
  'pyjwt>=2,<3'
  'uvicorn>=0.30,<1'
  'websockets>=13,<16'
)
wanted="$(printf '%s\n' "${requirements[@]}")"

if [[ -x "$venv/bin/python" && -f "$marker" && "$(cat "$marker")" == "$wanted" ]]; then
  exit 0
fi

python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${requirements[@]}"
printf '%s\n' "$wanted" >"$marker"
