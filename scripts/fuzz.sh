#!/usr/bin/env bash
# Runs each cargo-fuzz target of fuzz/ for a bounded time, one after another, and prints per
# target the executions, the coverage reached and whether anything was found. Exits
# non-zero when a target found an input that fails (crash, panic, timeout, out of memory);
# the input is left in fuzz/artifacts/<target>/.
#
#   FUZZ_SECONDS=60      seconds of fuzzing per target
#   FUZZ_TARGETS="..."   the targets to run (default: all, as `cargo fuzz list` names them)
#   FUZZ_SANITIZER=none  none or address: the code under test forbids `unsafe`, so AddressSanitizer
#                        only watches the dependencies, at about a seventh of the speed here
#
# Works on a stable toolchain: RUSTC_BOOTSTRAP=1 lets through the -Z flags cargo-fuzz
# passes. Seeds come from fuzz/seeds/<target>/ into fuzz/corpus/<target>/, which keeps
# what the runs add (gitignored, like fuzz/artifacts and the logs in fuzz/logs).
set -uo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${FUZZ_SECONDS:-60}
sanitizer=${FUZZ_SANITIZER:-none}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked || exit 1
fi

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
echo "building the fuzz targets (sanitizer: $sanitizer; the first build takes a few minutes)"
cargo fuzz build --sanitizer "$sanitizer" || exit 1

# The last value of one of libFuzzer's final `stat::` lines in the target's log.
final_stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }

mkdir -p logs
found=0
summary=()
for target in $targets; do
  mkdir -p "corpus/$target" "artifacts/$target"
  if [ -d "seeds/$target" ]; then
    cp -n "seeds/$target"/* "corpus/$target/" 2>/dev/null
  fi
  dict=()
  [ -f "dicts/$target.dict" ] && dict=("-dict=dicts/$target.dict")
  before=$(ls "artifacts/$target")
  log="logs/$target.log"
  echo "== $target: fuzzing for ${seconds}s (log: fuzz/$log)"
  started=$SECONDS
  cargo fuzz run --sanitizer "$sanitizer" "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=25 -print_final_stats=1 "${dict[@]}" >"$log" 2>&1
  status=$?
  took=$((SECONDS - started))
  execs=$(final_stat number_of_executed_units)
  rate=$(final_stat average_exec_per_sec)
  cov=$(grep -aoE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1)
  new=$(comm -13 <(echo "$before") <(ls "artifacts/$target") | sed "s|^|fuzz/artifacts/$target/|")
  if [ "$status" -ne 0 ] || [ -n "$new" ]; then
    found=1
    result="FOUND (exit $status): $(echo $new)"
    grep -aE -m 1 -A 1 "panicked at" "$log" | cut -c 1-300 | sed 's/^/    /'
    grep -aE -m 1 "^SUMMARY" "$log" | sed 's/^/    /'
  else
    result="nothing found"
  fi
  line="$target: ${took}s, ${execs:-?} execs (${rate:-?}/s), ${cov:-no coverage line}; $result"
  echo "$line"
  summary+=("$line")
done

echo
echo "fuzz summary:"
printf '  %s\n' "${summary[@]}"
if [ "$found" -ne 0 ]; then
  echo "a target found a failing input: reproduce with" \
    "'cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer <target> <artifact>'" >&2
  exit 1
fi
