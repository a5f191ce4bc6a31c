"""Orchestrator memory under a flood of concurrent sign-ins, before and after the bounded hashing
limiter, side by side in one run: the same flood against a real orchestrator process running
this tree and one running an older revision (``git archive REV``, default ``main``).  Also the
time an unknown account and a wrong password take (in-process, sequential), which should match.

    .venv/bin/python -m bench.login_flood [--before REV] [N]
"""

from __future__ import annotations

import argparse
from functools import partial
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from bench.common import describe, pct
from tests.polling import until
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


async def flood(src: Path, n: int) -> tuple[int, int, dict[int, int], float]:
    """(idle RSS, peak RSS, status counts, seconds) for ``n`` concurrent sign-ins."""
    data = tempfile.mkdtemp(prefix="marathon-bench-login-")
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(src),
        "MARATHON_DATA_DIR": data,
        "MARATHON_HTTP_LISTEN": f"tcp:127.0.0.1:{port}",
        "MARATHON_GATEWAY_LISTEN": "tcp:127.0.0.1:0",
        "MARATHON_LOG_LEVEL": "warning",
    }
    url = f"http://127.0.0.1:{port}"
    try:
        async with trio.open_nursery() as nursery:
            cmd = [sys.executable, "-m", "marathon", "serve", "--role", "orchestrator"]
            run = partial(trio.run_process, cmd, env=env, cwd=str(src), check=False, stderr=subprocess.DEVNULL)
            proc = await nursery.start(run)

            async def up() -> bool:
                try:
                    async with httpx.AsyncClient(trust_env=False, timeout=2) as c:
                        return (await c.get(url + "/healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(up, timeout=60)
            idle = status(proc.pid, "VmRSS")
            codes: dict[int, int] = {}
            t0 = time.perf_counter()
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=300) as c:

                async def one(i: int) -> None:
                    r = await c.post("/v1/auth/login", json={"email": f"f{i}@example.com", "password": "wrong pw!"})
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1

                async with trio.open_nursery() as n_:
                    for i in range(n):
                        n_.start_soon(one, i)
            took = time.perf_counter() - t0
            peak = status(proc.pid, "VmHWM")
            proc.terminate()
        return idle, peak, codes, took
    finally:
        shutil.rmtree(data, ignore_errors=True)


async def same_work() -> tuple[list[float], list[float]]:
    """Sequential sign-ins, in-process: a wrong password for an account that exists vs an
    account that does not (throttling out of the way)."""
    from marathon.errors import AuthError
    from marathon.orchestrator.auth import Accounts, LoginLimits
    from marathon.store import open_store

    tmp = tempfile.mkdtemp(prefix="marathon-bench-login-")
    store = await open_store(f"sqlite://{tmp}/a.db", tmp)
    limits = LoginLimits(account_failures=10**6, client_failures=10**6)
    accounts = Accounts(store, session_ttl=60, limits=limits)
    await accounts.register("known@example.com", "correct horse battery")
    wrong: list[float] = []
    unknown: list[float] = []
    try:
        for _ in range(20):
            for email, out in (("known@example.com", wrong), ("ghost@example.com", unknown)):
                t0 = time.perf_counter()
                try:
                    await accounts.login(email, "wrong password")
                except AuthError:
                    pass
                out.append(time.perf_counter() - t0)
    finally:
        await store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return wrong, unknown


def export(rev: str) -> Path:
    """The tree of ``rev`` in a temporary directory (``git archive``)."""
    old = Path(tempfile.mkdtemp(prefix="marathon-before-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    return old


async def main(before: str, old: Path, n: int) -> None:
    try:
        rows = []
        for name, src in ((f"before ({before})", old), ("after (this tree)", ROOT)):
            rows.append((name, *await flood(src, n)))
        print(f"orchestrator memory under {n} concurrent sign-ins (wrong passwords), real processes")
        for name, idle, peak, codes, took in rows:
            print(
                f"  {name:<22} idle RSS {idle / 2**20:6.0f} MiB   peak RSS (VmHWM) {peak / 2**20:6.0f} MiB   "
                f"answers {dict(sorted(codes.items()))} in {took:.1f}s"
            )
        wrong, unknown = await same_work()
        print("the same work for an unknown account and a wrong password (in-process, sequential)")
        print(describe("wrong password", wrong))
        print(describe("unknown account", unknown))
        print(f"  p50 ratio unknown / wrong: {pct(unknown, 50) / pct(wrong, 50):.3f}")
    finally:
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default="main")
    ap.add_argument("n", nargs="?", type=int, default=32)
    args = ap.parse_args()
    trio.run(main, args.before, export(args.before), args.n)
