# Everything runs from a project-local virtualenv built from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8765

NODE_DEPS := tests/node/node_modules/.package-lock.json
BENCH_NODE_DEPS := bench/node/node_modules/.package-lock.json

.PHONY: setup node-deps bench-node-deps systemd-tools redis run test lint typecheck pytest \
        bench clean install install-units install-systemd

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

## Node's ws with npm ci in $(1) (Node.js itself from Debian if missing); $(2): what is lost without.
define npm_ci
	@if ! command -v npm >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y nodejs npm; \
	  else echo "WARNING: no npm and not root: $(2)" >&2; \
	       exit 0; fi; \
	fi; \
	npm ci --prefix $(1) --no-audit --no-fund --loglevel=error && touch $@
endef

## Node's ws, the tests' independent client.
node-deps: $(NODE_DEPS)

$(NODE_DEPS): tests/node/package.json tests/node/package-lock.json
	$(call npm_ci,tests/node,the Node client tests will be skipped)

## Node's ws servers, the benchmark's peers.
bench-node-deps: $(BENCH_NODE_DEPS)

$(BENCH_NODE_DEPS): bench/node/package.json bench/node/package-lock.json
	$(call npm_ci,bench/node,the benchmark will skip the Node ws peers)

## systemd-analyze and systemd-socket-activate for the tests (Debian package systemd).
systemd-tools:
	@command -v systemd-socket-activate >/dev/null && command -v systemd-analyze >/dev/null \
	  || { apt-get update && apt-get install -y systemd; }

## redis-server for the relay tests (Debian package redis-server).
redis:
	@command -v redis-server >/dev/null || { apt-get update && apt-get install -y redis-server; }

## Run the daemon in the foreground on $(PORT) (extra flags: make run ARGS="--log-level debug").
run: setup
	$(BIN)/wsechod --port $(PORT) $(ARGS)

## Lint, type-check, then the whole test suite.
test: lint typecheck pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup node-deps systemd-tools redis
	$(BIN)/pytest $(PYTEST_ARGS)

## wsechod against the websockets example, Node's ws and others, in one run (see README).
bench: setup bench-node-deps
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info tests/node/node_modules \
	       bench/node/node_modules

## Install for production: a virtualenv in $(PREFIX) with wsechod in it.
PREFIX  ?= /opt/wsechod
WSECHOD ?= $(PREFIX)/bin/wsechod
install:
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install --quiet --disable-pip-version-check .

## The systemd units, with ExecStart pointing at $(WSECHOD), into $(DESTDIR)/etc/systemd/system.
install-units:
	install -d $(DESTDIR)/etc/systemd/system
	for unit in systemd/*.service systemd/*.socket; do \
	  sed 's|@WSECHOD@|$(WSECHOD)|' $$unit > $(DESTDIR)/etc/systemd/system/$$(basename $$unit); \
	  chmod 644 $(DESTDIR)/etc/systemd/system/$$(basename $$unit); \
	done

## Units, the sample config (never overwriting yours), then tell systemd.
install-systemd: install-units
	install -d $(DESTDIR)/etc/wsechod
	[ -e $(DESTDIR)/etc/wsechod/wsechod.toml ] || \
	  install -m 644 etc/wsechod.toml $(DESTDIR)/etc/wsechod/wsechod.toml
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
