"""Orchestrator replicas and nodes as processes of their own, on one PostgreSQL, Redis and
etcd: what the distributed failure tests and the cluster benchmark start."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sys
from contextlib import asynccontextmanager

import httpx
import trio

from bench.common import prepare_claude_stub
from marathon.config import load_config
from marathon.orchestrator.auth import Accounts, Principal
from marathon.secretbox import new_key
from marathon.store import open_store
from tests.browser import output_dir
from tests.harness import TEST_KEY, scratch_dir
from tests.polling import until

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


class Proc:
    def __init__(self, name: str, role: str, env: dict[str, str], tmp: str):
        self.name, self.role, self.env = name, role, env
        self.log = os.path.join(tmp, f"{name}.log")
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        with open(self.log, "ab") as f:
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "marathon", "serve", "--role", self.role], env=self.env, stdout=f, stderr=f
            )

    async def line(self, pattern: str, timeout: float = 60) -> re.Match:
        with trio.fail_after(timeout):
            while True:
                with open(self.log, errors="replace") as f:
                    found = re.search(pattern, f.read())
                if found:
                    return found
                assert self.proc is not None and self.proc.returncode is None, self.tail()
                await trio.sleep(0.05)

    def tail(self, n: int = 3000) -> str:
        with open(self.log, errors="replace") as f:
            return f"--- {self.name} ---\n" + f.read()[-n:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(20):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class Fleet:
    """Replicas and nodes of one test, sharing its PostgreSQL database, Redis and etcd prefix."""

    def __init__(self, pg_url: str, redis_url: str, etcd_endpoint: str):
        self.tmp = scratch_dir()
        self.pg_url = pg_url
        self.shared = {
            "store": pg_url,
            "redis_url": redis_url,
            "etcd_endpoints": etcd_endpoint,
            "etcd_prefix": f"/marathon-{secrets.token_hex(4)}/",
            "node_secret": secrets.token_urlsafe(32),
            "secrets_key": new_key(),
            "lease_ttl": 2,
            "leader_ttl": 2,
            "bus_poll_interval": 1,
            "heartbeat_interval": 0.5,
            "node_timeout": 3,
            "node_grace": 2,
            "assign_timeout": 5,
            "store_connect_timeout": 3,
            "claude_bin": prepare_claude_stub(),
            "anthropic_api_key": TEST_KEY,
            "anthropic_base_url": "http://127.0.0.1:9",
            "bwrap": "required",
            "log_level": "debug",
            "submit_burst": 200,  # the rate limit is not what these tests are about
        }
        self.replicas: dict[str, tuple[Proc, str, str]] = {}  # name -> (process, API url, gateway)
        self.nodes: dict[str, Proc] = {}
        self.procs: list[Proc] = []

    def _env(self, name: str, **kw) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/")}
        settings = {**self.shared, "data_dir": os.path.join(self.tmp, name), **kw}
        env.update({f"MARATHON_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    async def replica(self, name: str) -> tuple[Proc, str, str]:
        p = Proc(
            name,
            "orchestrator",
            self._env(name, http_listen="tcp:127.0.0.1:0", gateway_listen="tcp:127.0.0.1:0"),
            self.tmp,
        )
        self.procs.append(p)
        await p.start()
        api = (await p.line(r"API on (http://[\d.:]+)")).group(1)
        gateway = (await p.line(r"node gateway listening on (tcp:[\d.:]+)")).group(1)
        self.replicas[name] = (p, api, gateway)
        return self.replicas[name]

    async def node(self, name: str, *via: str, **settings) -> Proc:
        gateways = ",".join(self.replicas[r][2] for r in via)
        env = self._env(name, orchestrator=gateways, node_name=name, slots=2, **settings)
        p = Proc(name, "node", env, self.tmp)
        self.procs.append(p)
        await p.start()
        self.nodes[name] = p
        return p

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for p in reversed(self.procs):
                await p.stop()

    def logs(self) -> str:
        """The last lines of every log here; the whole logs are kept in the test output folder."""
        keep = output_dir("cluster")
        for p in self.procs:
            shutil.copy(p.log, keep / os.path.basename(p.log))
        return f"(whole logs in {keep})\n" + "\n".join(p.tail(1500) for p in self.procs)


async def admin_key(f: Fleet, data_dir: str | None = None) -> str:
    """An administrator's API key, made in the shared store (as `marathon admin` would); with
    ``data_dir``, in the embedded SQLite store of the replica there."""
    flags = {"secrets_key": f.shared["secrets_key"], "data_dir": data_dir or scratch_dir()}
    if data_dir is None:
        flags["store"] = f.pg_url
    config = load_config(flags, env={})
    store = await open_store(config.store, config.data_dir, config=config)
    try:
        accounts = Accounts(store, session_ttl=3600)
        admin = await accounts.ensure_local_admin()
        key, _ = await accounts.create_key(Principal(admin.id, admin.email, True), "cluster tests")
        return key
    finally:
        await store.close()


@asynccontextmanager
async def fleet(pg_url: str, redis_url: str, etcd_endpoint: str):
    f = Fleet(pg_url, redis_url, etcd_endpoint)
    try:
        yield f
    except BaseException:
        print(f.logs())
        raise
    finally:
        await f.close()


@asynccontextmanager
async def client(api: str, key: str):
    async with httpx.AsyncClient(
        base_url=api, timeout=15, trust_env=False, headers={"Authorization": f"Bearer {key}"}
    ) as c:
        yield c


async def cluster(c: httpx.AsyncClient) -> dict:
    r = await c.get("/v1/cluster")
    assert r.status_code == 200, r.text
    return r.json()


async def wait_nodes(c: httpx.AsyncClient, n: int) -> None:
    async def enough() -> bool:
        try:
            return len((await cluster(c))["nodes"]) >= n
        except (httpx.HTTPError, AssertionError):
            return False

    await until(enough, timeout=60, interval=0.1)


async def finished(c: httpx.AsyncClient, task_ids: list[str], timeout: float = 120) -> dict[str, dict]:
    out: dict[str, dict] = {}

    async def all_done() -> bool:
        for tid in task_ids:
            if tid in out:
                continue
            try:
                r = await c.get(f"/v1/tasks/{tid}")
            except httpx.HTTPError:
                return False
            if r.status_code == 200 and r.json()["state"] in TERMINAL:
                out[tid] = r.json()
        return len(out) == len(task_ids)

    await until(all_done, timeout=timeout, interval=0.2)
    return out


async def states_of(c: httpx.AsyncClient, task_id: str) -> list[str]:
    r = await c.get(f"/v1/tasks/{task_id}/events", params={"follow": "0"})
    assert r.status_code == 200
    return re.findall(r'"state":"(\w+)"', r.text)


async def submit(c: httpx.AsyncClient, prompt: str) -> str:
    r = await c.post("/v1/tasks", json={"prompt": prompt})
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def follow(c: httpx.AsyncClient, task_id: str, into: list[dict], *, after: int = 0) -> None:
    """Read the task's event stream into ``into`` (dicts with id, event, data) until it ends or
    the connection breaks; resumes after event ``after`` (Last-Event-ID)."""
    headers = {"Last-Event-ID": str(after)} if after else {}
    ev: dict = {}
    try:
        async with c.stream(
            "GET",
            f"/v1/tasks/{task_id}/events",
            params={"follow": "1"},
            headers=headers,
            timeout=httpx.Timeout(10, read=None),
        ) as r:
            async for line in r.aiter_lines():
                if line == "":
                    if "id" in ev:
                        into.append(ev)
                    ev = {}
                elif line.startswith("id: "):
                    ev["id"] = int(line[4:])
                elif line.startswith("event: "):
                    ev["event"] = line[7:]
                elif line.startswith("data: "):
                    ev["data"] = line[6:]
    except httpx.HTTPError:
        pass  # the replica went away: resume elsewhere
