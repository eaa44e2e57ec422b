#!/usr/bin/env bash
# Makes the console screenshots in docs/ (console-overview.png, console-activity.png):
# a redis-server and two dev nodes on free ports, 24 sockets, a stream of row events, then
# headless Chromium on node a's console, its test socket and publish form in use.
# Needs redis-server and chromium (`make deps` installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --test e2e console_browser::screenshots -- --ignored --exact
ls -l docs/console-*.png
