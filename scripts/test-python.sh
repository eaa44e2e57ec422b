#!/usr/bin/env bash
# The Python package's tests (clients/python): makes its venv when missing or when
# pyproject.toml changed, makes sure the gateway binary the tests start exists
# (CHANNELGATE_BIN, else target/debug/channelgate, which `cargo test` builds too), then
# runs pytest and exits with its status. pytest's closing line ("N passed, N failed in
# ...") is printed as pytest prints it; arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
pkg=clients/python
venv=$pkg/.venv
stamp=$venv/.installed-$(sha256sum "$pkg/pyproject.toml" | cut -c1-16)

if [ ! -e "$stamp" ]; then
  echo "making $venv"
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv" || exit 1
  "$venv/bin/python" -m pip install -q --upgrade pip || exit 1
  "$venv/bin/python" -m pip install -q -e "$pkg[test]" || exit 1
  touch "$stamp"
fi

if [ -z "${CHANNELGATE_BIN:-}" ] && [ ! -x target/debug/channelgate ]; then
  cargo build --bin channelgate || exit 1
fi

cd "$pkg" && exec .venv/bin/python -m pytest "$@"
