"""Startup and size of the one-file executable, beside the same CLI from the venv.

make build && .venv/bin/python -m bench.executable [RUNS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.common import describe, pct
from tests.harness import REPO_ROOT

EXE = str(REPO_ROOT / "dist" / "marathon")


def timed(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main(runs: int) -> None:
    if not os.access(EXE, os.X_OK):
        sys.exit(f"{EXE} missing: make build")
    timed([EXE, "--help"], 2)
    exe = timed([EXE, "--help"], runs)
    venv = timed([sys.executable, "-m", "marathon", "--help"], runs)
    size = os.path.getsize(EXE)
    print(f"one-file executable: {size / 1e6:.1f} MB ({EXE})")
    print(describe("dist/marathon --help", exe))
    print(describe("baseline: python -m marathon --help", venv))
    print(f"ratio executable/venv p50: {pct(exe, 50) / pct(venv, 50):.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
