# channelgate: the two commands that do everything on a fresh machine are `make run`
# and `make test`.

CARGO ?= cargo

.PHONY: run test lint deps build release

## The gateway on the embedded default: in-memory bus, dev settings, sample token printed.
run:
	$(CARGO) run --release -- --dev

## Install what is missing, then run every check and test.
test: deps lint
	$(CARGO) test --all-targets

## fmt and clippy, as CI runs them.
lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Rust components the checks need (the toolchain itself comes with the machine).
deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy

build:
	$(CARGO) build

release:
	$(CARGO) build --release
