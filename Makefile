# channelgate: the two commands that do everything on a fresh machine are `make run`
# and `make test`.

CARGO ?= cargo

.PHONY: run test lint deps build release cluster bench fuzz

## The gateway on the embedded default: in-memory bus, dev settings, presence on; prints
## the console's URL and a sample token.
run:
	$(CARGO) run --release -- --dev --presence on

## Install what is missing, then run every check and test.
test: deps lint
	bash scripts/test.sh

## fmt and clippy, as CI runs them.
lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## What the checks need: rustfmt and clippy, redis-server and redis-cli for the cluster
## tests (each test starts its own servers on free ports, a Redis Cluster with
## redis-cli), chromium for the console tests (run headless), and python3 with venv for
## the Python package's tests (scripts/test-python.sh makes their venv).
deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	@{ command -v redis-server && command -v redis-cli; } >/dev/null || { \
	  echo "installing redis-server and redis-cli"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server redis-tools >/dev/null; }
	@command -v chromium >/dev/null || { \
	  echo "installing chromium (the console tests drive it headless)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@python3 -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "installing python3 with venv"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq python3 python3-venv >/dev/null; }

## A local cluster to try: two dev nodes (WebSocket on 8081 and 8082, gRPC on 50061 and
## 50062) on a redis-server on port 6390; REDIS_CLUSTER=1 puts them on a Redis Cluster
## instead, three primaries with a replica each on ports 7001-7006
## (scripts/redis-cluster.sh). Ctrl-C stops them all.
cluster: deps
	$(CARGO) build --release
	REDIS_CLUSTER=$(REDIS_CLUSTER) bash scripts/cluster.sh

## Side-by-side benchmarks (channelgate, a raw broadcaster, sockudo, Django Channels): S1
## and S3 at fixed rates with deliveries per server CPU-second, one tokio worker each (and S1 on two),
## in rounds taking turns; S2, S4, S5, S6 (publish ingest, one node and two through Redis);
## what event history costs (H1, R1, R2); and S5 on a Redis Cluster against one Redis;
## writes BENCHMARKS.md. About half an hour;
## sets up its Python venv under bench/ and builds sockudo (up to 40 minutes) on first use. ONLY=classic, fanout, ingest,
## history or cluster (S5 on one Redis against S5 on a Redis Cluster) runs a part, into
## target/bench/BENCHMARKS-$$ONLY.md; ONLY=presence runs
## bench/presence.sh (presence in one space of 1,000, off / on / two nodes; about two
## minutes) into target/bench/presence.md; ONLY=compression runs bench/compression.sh
## (bytes per delivery against Baserow's compressing stack, S1 with deflate, RSS per
## connection) into target/bench/compression.md; bench/run.sh lists the other knobs.
## `bash bench/callgrind.sh` counts instructions per delivery instead (no noise).
bench: deps
	bash bench/run.sh

## cargo-fuzz on the client frame parser, page parameters, the token verifier, the publish
## checks and the WebSocket frame decoder, each for FUZZ_SECONDS (default 60) in turn, on the
## stable toolchain; installs cargo-fuzz when missing. Fails on a finding (fuzz/artifacts/).
fuzz:
	bash scripts/fuzz.sh

build:
	$(CARGO) build

release:
	$(CARGO) build --release
