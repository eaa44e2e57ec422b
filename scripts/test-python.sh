#!/usr/bin/env bash
# The Python package's tests (clients/python), on both ends of the grpcio range the
# package claims: in .venv with the newest grpcio, then in .venv-oldest with the oldest
# (GRPCIO_OLDEST, the floor in pyproject.toml). Each venv is made when missing or when
# pyproject.toml changed. Makes sure the gateway binary the tests start exists
# (CHANNELGATE_BIN, else target/debug/channelgate, which `cargo test` builds too), then
# runs pytest in each and exits non-zero if either failed. pytest's closing lines
# ("N passed, N failed in ...") are printed as pytest prints them, one per venv;
# arguments go to both pytest runs. GRPCIO_OLDEST= (empty) skips the second run.
set -uo pipefail
cd "$(dirname "$0")/.."
pkg=clients/python
oldest=${GRPCIO_OLDEST-1.51.3}

# make_venv DIR [PIP ARGS...]: the package with its test extra, and what follows.
make_venv() {
  local venv=$1
  shift
  local stamp
  stamp=$venv/.installed-$({ cat "$pkg/pyproject.toml"; [ $# -eq 0 ] || echo "$*"; } | sha256sum | cut -c1-16)
  if [ ! -e "$stamp" ]; then
    echo "making $venv $*"
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv" || return 1
    "$venv/bin/python" -m pip install -q --upgrade pip || return 1
    "$venv/bin/python" -m pip install -q -e "$pkg[test]" "$@" || return 1
    touch "$stamp"
  fi
}

make_venv "$pkg/.venv" || exit 1
if [ -n "$oldest" ]; then
  make_venv "$pkg/.venv-oldest" "grpcio==$oldest" || exit 1
fi

if [ -z "${CHANNELGATE_BIN:-}" ] && [ ! -x target/debug/channelgate ]; then
  cargo build --bin channelgate || exit 1
fi

cd "$pkg" || exit 1
status=0
for venv in .venv ${oldest:+.venv-oldest}; do
  echo "== clients/python on grpcio $("$venv/bin/python" -c 'import grpc; print(grpc.__version__)') ($venv)"
  "$venv/bin/python" -m pytest "$@" || status=1
done
exit "$status"
