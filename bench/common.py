"""Shared set-up for benchmarks: a real Marathon (embedded) with a stand-in Claude Code."""

from __future__ import annotations

import hashlib
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

FAKE_CLAUDE = str(Path(__file__).resolve().parent / "fake_claude.sh")


def pct(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def describe(name: str, values: Sequence[float], unit: str = "ms", scale: float = 1000.0) -> str:
    v = [x * scale for x in values]
    return (
        f"{name:<38} n={len(v):<3} p50 {pct(v, 50):8.1f} {unit}  p99 {pct(v, 99):8.1f} {unit}  "
        f"mean {statistics.fmean(v):8.1f} {unit}"
    )


def prepare_claude_stub() -> str:
    """The stub must be readable by the sandbox uid: copy it to a traversable place, named by
    its content (checkouts with another version of it, running at the same time, keep theirs)."""
    with open(FAKE_CLAUDE, "rb") as src:
        body = src.read()
    dst = f"/tmp/marathon-bench-claude-{hashlib.sha256(body).hexdigest()[:12]}.sh"
    tmp = f"{dst}.{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(body)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dst)  # whole or not at all, for a sandbox starting it right now
    return dst


def _cleanup() -> None:
    import shutil

    from tests.harness import SCRATCH

    for d in SCRATCH:
        shutil.rmtree(d, ignore_errors=True)


import atexit  # noqa: E402

atexit.register(_cleanup)
