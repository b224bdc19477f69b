# Everything runs from a project-local virtualenv built from pyproject.toml, with $(PYTHON)
# (3.11 or newer): make setup PYTHON=python3.12 picks another interpreter.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8765

NODE_DEPS := tests/node/node_modules/.package-lock.json
BENCH_NODE_DEPS := bench/node/node_modules/.package-lock.json

.PHONY: setup python-version node-deps bench-node-deps systemd-tools redis browser run test \
        check lint typecheck docs docs-serve pytest unit \
        bench bench-scale clean install install-units install-systemd \
        container-tools wheelhouse image image-base redis-image test-image

# An interpreter's version and installation ("3.11.7 /usr"); a venv's python gives its base's.
PY_ID := import os, sys; print("%d.%d.%d" % sys.version_info[:3], os.path.realpath(sys.base_prefix))
# "ok", or what $(PYTHON) is instead.
PYTHON_OK = $(shell v=$$($(PYTHON) --version 2>/dev/null); case "$$v" in \
  ("Python 3.1"[1-9]*|"Python 3."[2-9][0-9]*|"Python "[4-9]*) echo ok;; \
  (*) echo "$${v:-not a Python that runs}";; esac)

## .venv, rebuilt from scratch when another interpreter made it (or it no longer runs).
setup: python-version
	@want=$$($(PYTHON) -c '$(PY_ID)'); have=$$($(BIN)/python -c '$(PY_ID)' 2>/dev/null); \
	if [ -e $(VENV) ] && [ "$$have" != "$$want" ]; then \
	  echo "$(VENV) was made by Python $${have:-that no longer runs}, not by $(PYTHON)" \
	       "($$want): rebuilding it" >&2; \
	  rm -rf $(VENV); \
	fi
	@$(MAKE) --no-print-directory installed

## Fail first, in one line, rather than deep inside pip.
python-version:
	$(if $(filter ok,$(PYTHON_OK)),@:,$(error wsechod needs Python 3.11 or newer and $(PYTHON) is $(PYTHON_OK): choose one with make setup PYTHON=python3.12))

## The packages, (re)installed when pyproject.toml is newer; silent when it is not (asked for
## $(STAMP) itself, make would say that it "is up to date", which is make's business).
.PHONY: installed
installed: $(STAMP)
	@:

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,redis]'
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

## Chromium for the tests of the docs' browser client (Debian package chromium).
browser:
	@command -v chromium >/dev/null || { apt-get update && apt-get install -y chromium; }

## podman, runc and debootstrap for make image and the container tests (Debian packages).
container-tools:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
	  || { apt-get update && apt-get install -y podman runc debootstrap; }

## The image (Containerfile) as $(IMAGE), from $(IMAGE_BASE): here a Debian root file system
## made once by debootstrap (container/base.sh), the dependencies' wheels downloaded first
## into $(WHEELHOUSE) for the image's Python ($(IMAGE_PYTHON)), so the build needs no index
## (async-timeout: redis-py needs it below Python 3.11.3, Debian 12 has 3.11.2).
## PODMAN: podman with this project's settings for machines like its own (containers.conf).
PODMAN       ?= env CONTAINERS_CONF=$(CURDIR)/container/containers.conf podman
IMAGE        ?= localhost/wsechod:latest
IMAGE_BASE   ?= localhost/wsechod-base:bookworm
IMAGE_PYTHON ?= 3.11
WHEELHOUSE   := build/wheelhouse
ARCH         := $(shell uname -m)
VERSION       = $(shell $(BIN)/python -c 'import wsechod; print(wsechod.__version__)')

wheelhouse: $(WHEELHOUSE)/.complete

$(WHEELHOUSE)/.complete: pyproject.toml Makefile | setup
	rm -rf $(WHEELHOUSE)
	$(BIN)/python -m pip download -qq --disable-pip-version-check --only-binary=:all: \
	  --python-version $(IMAGE_PYTHON) --implementation cp \
	  $(foreach p,manylinux_2_36 manylinux_2_28 manylinux_2_17 manylinux2014,--platform $(p)_$(ARCH)) \
	  --platform any --dest $(WHEELHOUSE) '.[redis]' pip 'setuptools>=77' async-timeout
	touch $@

image: image-base wheelhouse
	$(PODMAN) build --quiet --format docker --build-arg BASE=$(IMAGE_BASE) \
	  --build-arg PYTHON=$(IMAGE_PYTHON) --build-arg VERSION=$(VERSION) --tag $(IMAGE) \
	  --file Containerfile . >/dev/null
	@$(PODMAN) image inspect --format '$(IMAGE): {{.Size}} bytes' $(IMAGE)

## The base image, made once where it is the local one (container/base.sh).
image-base: container-tools
	@case "$(IMAGE_BASE)" in localhost/wsechod-base:*) \
	  PODMAN="$(PODMAN)" container/base.sh $(IMAGE_BASE) $${IMAGE_BASE##*:};; esac

## Redis for the compose test, from Debian's packages (the build's apt-get needs the network).
REDIS_IMAGE := localhost/wsechod-redis:bookworm
redis-image: image-base
	@$(PODMAN) image exists $(REDIS_IMAGE) || $(PODMAN) build --quiet --network host \
	  --build-arg BASE=$(IMAGE_BASE) --tag $(REDIS_IMAGE) --file container/redis.Containerfile \
	  container >/dev/null

## The container tests alone (make test runs them too), against an image of their own: the
## suites of two checkouts may run at once. Afterwards the image goes, and so do the build
## stages of builds more than an hour old (not one another checkout is building from).
TEST_IMAGE := localhost/wsechod:test-$(shell printf '%s' '$(CURDIR)' | cksum | cut -d' ' -f1)
TEST_ENV = WSECHOD_TEST_IMAGE=$(TEST_IMAGE) WSECHOD_TEST_REDIS_IMAGE=$(REDIS_IMAGE) \
  PODMAN="$(PODMAN)"
FORGET_IMAGES = $(PODMAN) image rm --force $(TEST_IMAGE) >/dev/null; \
  $(PODMAN) image prune --force --filter label=org.wsechod.stage=build --filter until=1h >/dev/null
test-image: setup redis redis-image
	$(MAKE) --no-print-directory image IMAGE=$(TEST_IMAGE)
	$(TEST_ENV) $(BIN)/pytest tests/test_image.py $(PYTEST_ARGS); \
	  status=$$?; $(FORGET_IMAGES); exit $$status

## Run the daemon in the foreground on $(PORT) (extra flags: make run ARGS="--log-level debug").
run: setup
	$(BIN)/wsechod --port $(PORT) $(ARGS)

## Lint, type-check, build the docs, then the whole test suite (what CI runs).
test: lint typecheck docs pytest

## The edit loop, under a minute: lint, type-check and the unit tests (marked unit: they
## start no process and no server).
check: lint typecheck unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup node-deps systemd-tools redis browser redis-image
	$(MAKE) --no-print-directory image IMAGE=$(TEST_IMAGE)
	$(TEST_ENV) $(BIN)/pytest $(PYTEST_ARGS); \
	  status=$$?; $(FORGET_IMAGES); exit $$status

## The tests marked unit, collected from the files that have some (the others are not
## even imported: test_node_client.py, say, skips loudly at import without Node).
unit: setup
	$(BIN)/pytest -q -m unit $(PYTEST_ARGS) $(shell grep -l 'pytest.mark.unit' tests/test_*.py)

## The documentation site (mkdocs.yml, docs/) into $(SITE); --strict: a broken link or
## anchor, or a page left out of the navigation, fails the build. (Not --quiet: it hides
## the warnings from --strict too, and the build passes. NO_MKDOCS_2_WARNING: Material's
## notice about MkDocs 2.0, printed at every build otherwise.)
SITE ?= site
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE)

## The site on http://127.0.0.1:8000, rebuilt as pages change.
docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict

## wsechod against the websockets example, Node's ws and others, in one run (docs/benchmarks.md).
bench: setup bench-node-deps redis
	$(BIN)/python -m bench $(BENCH_ARGS)

## 100,000 idle connections to one daemon with 6 workers, a drain, a restart and a recycle
## with every client reconnecting, then one process at its open-files limit (docs/scale.md;
## about 12 minutes, 2 GiB of memory).
bench-scale: setup
	$(BIN)/python -m bench.scale $(SCALE_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info tests/node/node_modules \
	       bench/node/node_modules $(SITE)

## Install for production: a virtualenv in $(PREFIX) with wsechod in it.
PREFIX  ?= /opt/wsechod
WSECHOD ?= $(PREFIX)/bin/wsechod
install: python-version
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install --quiet --disable-pip-version-check '.[redis]'

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
