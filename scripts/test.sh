#!/usr/bin/env bash
# Runs every test of the workspace, then the Python package's tests, and closes with one
# summary line over all of them ("tests: N passed, N failed"), since cargo prints one
# result line per binary (the last may be a binary without tests) and pytest its own.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
bash scripts/test-python.sh 2>&1 | tee -a "$log"
python_status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$python_status
# cargo: "test result: ok. 5 passed; 0 failed; ..."; pytest: "== 12 passed, 1 failed in 3.1s ==" (no "=" with -q).
awk '/^test result:/ || /^(=+ )?[0-9]+ (passed|failed|errors?)[ ,]/ {
       for (i = 1; i <= NF; i++) {
         if ($(i+1) ~ /^passed/) p += $i
         if ($(i+1) ~ /^(failed|errors?)[,;]?$/) f += $i
       }
     }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
