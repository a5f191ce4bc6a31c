# Marathon — build, test and run.  `make test` installs everything it needs from nothing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CACHE := .cache
CLAUDE_CODE_VERSION := 2.1.332
CLAUDE_DIR := $(CACHE)/claude-code
CLAUDE_BIN := $(CLAUDE_DIR)/node_modules/@anthropic-ai/claude-code/bin/claude.exe
DEBIAN_PACKAGES := bubblewrap git sqlite3 util-linux procps binutils iproute2 iptables redis-server etcd-server systemd chromium chromium-driver e2fsprogs mount
PG_BIN := /usr/lib/postgresql/15/bin
TASK ?= add a CONTRIBUTING.md
REPO ?=

.PHONY: all venv claude-code system-deps test test-fast lint fmt build run clean bench install uninstall

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
	[ -x $(PG_BIN)/postgres ] || missing="$$missing postgresql-15"; \
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
	$(PY) -m bench.sandbox
	$(PY) -m bench.store
	$(PY) -m bench.metrics_scrape

clean:
	rm -rf build dist marathon.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -path ./.venv -prune -o -path ./.cache -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

-include snapshots/image.mk
-include snapshots/firecracker.mk

dist/marathon: $(VENV)/.installed marathon.spec $(shell find marathon packaging -name '*.py') $(wildcard marathon/web/*)
	$(VENV)/bin/pyinstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller marathon.spec
	@ls -la dist/marathon

build: dist/marathon

# ---------------------------------------------------------------- install
# make install [DESTDIR=/staging] [PREFIX=/usr/local]: the executable, the systemd units and
# commented example settings (<role>.env.example, and <role>.env when there is none yet).
# make uninstall removes them again; an env file you edited, and the state in
# /var/lib/marathon-*, stay.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
EXECUTABLE ?= dist/marathon
UNITS := marathon-orchestrator.service marathon-node.service marathon.target
ROLES := orchestrator node

install: $(EXECUTABLE)
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR)
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/marathon
	install -m 0755 $(EXECUTABLE) $(DESTDIR)$(BINDIR)/marathon
	for u in $(UNITS); do \
	  sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' packaging/systemd/$$u >$(DESTDIR)$(UNITDIR)/$$u.tmp && \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.tmp && mv $(DESTDIR)$(UNITDIR)/$$u.tmp $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	for r in $(ROLES); do \
	  install -m 0644 packaging/env/$$r.env $(DESTDIR)$(SYSCONFDIR)/marathon/$$r.env.example || exit 1; \
	  [ -e $(DESTDIR)$(SYSCONFDIR)/marathon/$$r.env ] || install -m 0600 packaging/env/$$r.env $(DESTDIR)$(SYSCONFDIR)/marathon/$$r.env || exit 1; \
	done
	@echo "installed $(BINDIR)/marathon and the units in $(UNITDIR)."
	@echo "next: edit $(SYSCONFDIR)/marathon/<role>.env, then: systemctl daemon-reload && systemctl enable --now marathon-<role>.service marathon.target"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/marathon
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
	for r in $(ROLES); do \
	  f=$(DESTDIR)$(SYSCONFDIR)/marathon/$$r.env; \
	  if cmp -s $$f packaging/env/$$r.env; then rm -f $$f; elif [ -e $$f ]; then echo "kept $$f (edited)"; fi; \
	  rm -f $$f.example; \
	done
	-rmdir $(DESTDIR)$(SYSCONFDIR)/marathon 2>/dev/null
