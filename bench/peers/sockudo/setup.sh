#!/usr/bin/env bash
# Installs the sockudo peer for bench/run.sh, once: `cargo install sockudo --version
# SOCKUDO_VERSION --locked` from the Rust package registry into SOCKUDO_ROOT, building in SOCKUDO_ROOT-target
# (kept, so an interrupted build goes on where it stopped), both outside the work tree.
# Does nothing when SOCKUDO_ROOT/bin/sockudo is that version already. Prints the binary's path
# on stdout; everything else goes to stderr, and the build's output to SOCKUDO_ROOT.log.
#
# The build needs protoc (Debian's protobuf-compiler: installed with apt-get when missing and
# this runs as root), takes 25-40 minutes on 2 cores and about 1.1 GB of disk. Exits 1 when
# sockudo cannot be built, saying why.
#
#   SOCKUDO_VERSION  [5.2.0]
#   SOCKUDO_ROOT     [${XDG_CACHE_HOME:-~/.cache}/channelgate-bench/sockudo]
set -euo pipefail
version=${SOCKUDO_VERSION:-5.2.0}
root=${SOCKUDO_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/channelgate-bench/sockudo}
bin=$root/bin/sockudo

if [[ -x $bin ]] && [[ $("$bin" --version 2>/dev/null) == *" $version" ]]; then
  echo "$bin"
  exit 0
fi
if ! command -v protoc >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "sockudo's build needs protoc: apt-get install protobuf-compiler" >&2
    apt-get install -y -qq protobuf-compiler >&2 ||
      { apt-get update -qq >&2 && apt-get install -y -qq protobuf-compiler >&2; } || true
  fi
  if ! command -v protoc >/dev/null; then
    echo "sockudo cannot be built here: no protoc (Debian's protobuf-compiler)" >&2
    exit 1
  fi
fi
mkdir -p "$root"
echo "building sockudo $version with cargo install (25-40 minutes on 2 cores), log in $root.log" >&2
if ! CARGO_TARGET_DIR=$root-target cargo install sockudo --version "$version" --locked \
  --root "$root" >"$root.log" 2>&1; then
  echo "sockudo $version did not build; the end of $root.log:" >&2
  tail -n 15 "$root.log" >&2
  exit 1
fi
echo "$bin"
