# Marathon — build, test and run.  `make test` installs everything it needs from nothing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CACHE := .cache
CLAUDE_CODE_VERSION := 2.1.332
CLAUDE_DIR := $(CACHE)/claude-code
CLAUDE_BIN := $(CLAUDE_DIR)/node_modules/@anthropic-ai/claude-code/bin/claude.exe
DEBIAN_PACKAGES := bubblewrap git util-linux procps binutils iproute2 iptables
TASK ?= add a CONTRIBUTING.md
REPO ?=

.PHONY: all venv claude-code system-deps test test-fast lint fmt build run clean bench

all: venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

$(CLAUDE_BIN):
	mkdir -p $(CLAUDE_DIR)
	npm install --no-audit --no-fund --prefix $(CLAUDE_DIR) @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION)
	test -x $(CLAUDE_BIN)

claude-code: $(CLAUDE_BIN)

system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (install them with apt-get)"; exit 1; fi; fi

test: MARATHON_BIN = dist/marathon-dir
test: system-deps venv claude-code build firecracker image image-prune
	MARATHON_CLAUDE_BIN=$(abspath $(CLAUDE_BIN)) $(PY) -m pytest -q $(PYTEST_ARGS)

run: system-deps venv claude-code
	packaging/run-demo.sh "$(TASK)" "$(REPO)"

# no Claude Code, no KVM, no guest image needed: the unit and protocol tests, the gateway against scripted nodes
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not vm and not firecracker" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# the benchmarks that need no guest image (bench/vm.py: make image first; Firecracker: make firecracker-bench)
bench: system-deps venv build
	$(PY) -m bench.control_plane
	$(PY) -m bench.events
	$(PY) -m bench.proxy
	$(PY) -m bench.repo
	$(PY) -m bench.executable

clean:
	rm -rf build dist marathon.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -path ./.venv -prune -o -path ./.cache -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

-include snapshots/image.mk
-include snapshots/firecracker.mk

dist/marathon: $(VENV)/.installed marathon.spec $(shell find marathon packaging -name '*.py')
	$(VENV)/bin/pyinstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller marathon.spec
	@ls -la dist/marathon

build: dist/marathon
