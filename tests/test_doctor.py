"""``marathon doctor``: a table of what this host can run and enforce, with an exit code."""

from __future__ import annotations

import os
import subprocess
import sys

from marathon.node.cgroups import Cgroups
from tests.harness import claude_bin


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "MARATHON_CLAUDE_BIN": claude_bin(), **env}
    return subprocess.run([sys.executable, "-m", "marathon", "doctor", *args], capture_output=True, text=True,
                          env=full, timeout=120)  # fmt: skip


def test_node_checks_say_what_this_host_enforces(tmp_path):
    res = doctor("--no-client", "--data-dir", str(tmp_path))
    rows = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("virtualisation", "firecracker", "qemu", "bubblewrap", "seccomp", "limits", "disk", "claude", "clock"):
        assert name in rows, res.stdout
    assert Cgroups.detect("x", setup=False).describe() in rows["limits"]
    assert "2.1.332" in rows["claude"]


def test_a_failed_check_fails_the_command(tmp_path):
    res = doctor("--no-node", "--url", "http://127.0.0.1:9")
    assert res.returncode == 1 and "FAIL" in res.stdout and "127.0.0.1:9" in res.stdout
    res = doctor("--no-client", "--data-dir", str(tmp_path), MARATHON_CLAUDE_BIN=str(tmp_path / "missing"))
    assert res.returncode == 1 and "Claude Code CLI not found" in res.stdout
