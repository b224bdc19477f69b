# Everything runs from a project-local virtualenv built from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8765

NODE_DEPS := tests/node/node_modules/.package-lock.json

.PHONY: setup node-deps run test lint typecheck pytest bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

## Node's ws, the tests' independent client (Node.js itself from Debian if missing).
node-deps: $(NODE_DEPS)

$(NODE_DEPS): tests/node/package.json tests/node/package-lock.json
	@if ! command -v npm >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y nodejs npm; \
	  else echo "WARNING: no npm and not root: the Node client tests will be skipped" >&2; \
	       exit 0; fi; \
	fi; \
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error && touch $@

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

pytest: setup node-deps
	$(BIN)/pytest $(PYTEST_ARGS)

## wsechod against the websockets deployment-docs example, in one run.
bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info tests/node/node_modules
