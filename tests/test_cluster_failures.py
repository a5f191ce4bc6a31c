"""Distributed mode as deployed: orchestrator replicas and nodes in their own processes on one
PostgreSQL, Redis and etcd, and each part dying in turn.

- the leader replica SIGKILLed mid-run: the other leads within the lease TTL; every task ends
  once, succeeded;
- a node SIGKILLed mid-task: its task is queued again and finishes on another node;
- PostgreSQL, then Redis, then etcd restarted during a run: the API answers 503 (not a hang)
  while the store is down, and every task still succeeds;
- a node stopped (SIGSTOP) past its lease, then resumed: its task ran again elsewhere; the stale
  attempt is refused (fenced by the attempt number) and the task ends once.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import sys
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from bench.common import prepare_claude_stub
from marathon.config import load_config
from marathon.orchestrator.auth import Accounts, Principal
from marathon.secretbox import new_key
from marathon.store import open_store
from tests.browser import output_dir
from tests.harness import TEST_KEY, scratch_dir
from tests.polling import until

pytestmark = pytest.mark.slow

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

    async def node(self, name: str, *via: str) -> Proc:
        gateways = ",".join(self.replicas[r][2] for r in via)
        p = Proc(name, "node", self._env(name, orchestrator=gateways, node_name=name, slots=2), self.tmp)
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


async def admin_key(f: Fleet) -> str:
    """An administrator's API key, made in the shared store (as `marathon admin` would)."""
    config = load_config({"store": f.pg_url, "secrets_key": f.shared["secrets_key"], "data_dir": scratch_dir()}, env={})
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


async def test_the_leader_killed_mid_run(pg_url, redis_server, etcd_server):
    async with fleet(pg_url, redis_server.url, etcd_server.endpoint) as f:
        key = await admin_key(f)
        await f.replica("a")
        await f.replica("b")
        await f.node("n1", "a", "b")
        await f.node("n2", "b", "a")
        await f.node("n3", "a", "b")
        async with client(f.replicas["a"][1], key) as ca, client(f.replicas["b"][1], key) as cb:
            await wait_nodes(ca, 3)
            tasks = [await submit((ca, cb)[i % 2], "sleep:2") for i in range(12)]

            async def some_running() -> bool:
                r = await ca.get("/v1/tasks", params={"state": "running"})
                return r.status_code == 200 and len(r.json()["tasks"]) >= 3

            await until(some_running, timeout=60, interval=0.1)
            leader = next(r for r in (await cluster(ca))["replicas"] if r["leader"])
            dead, survivor = ("a", cb) if leader["url"] == f.replicas["a"][1] else ("b", ca)
            await f.replicas[dead][0].kill()
            t0 = trio.current_time()

            async def survivor_leads() -> bool:
                try:
                    rs = (await cluster(survivor))["replicas"]
                except (httpx.HTTPError, AssertionError):
                    return False
                return len(rs) == 1 and rs[0]["leader"] and rs[0]["self"]

            await until(survivor_leads, timeout=30, interval=0.1)
            print(f"failover: the survivor leads {trio.current_time() - t0:.2f}s after the SIGKILL")
            done = await finished(survivor, tasks, timeout=120)
            assert {t["state"] for t in done.values()} == {"succeeded"}, done
            for tid in tasks:
                assert (await states_of(survivor, tid)).count("succeeded") == 1


async def test_a_node_killed_mid_task_hands_its_task_to_another(pg_url, redis_server, etcd_server):
    async with fleet(pg_url, redis_server.url, etcd_server.endpoint) as f:
        key = await admin_key(f)
        await f.replica("a")
        await f.replica("b")
        await f.node("n1", "a", "b")
        await f.node("n2", "b", "a")
        async with client(f.replicas["a"][1], key) as c:
            await wait_nodes(c, 2)
            tid = await submit(c, "sleep:6")
            await until(lambda: _state(c, tid, "running"), timeout=60, interval=0.1)
            first = (await c.get(f"/v1/tasks/{tid}")).json()["node_id"]
            victim = next(p for p in f.nodes.values() if _node_id(f, p) == first)
            await victim.kill()
            done = (await finished(c, [tid], timeout=120))[tid]
            assert done["state"] == "succeeded" and done["attempt"] == 2 and done["node_id"] != first, done
            states = await states_of(c, tid)
            assert states.count("succeeded") == 1 and "queued" in states[1:], states


async def test_store_bus_and_registry_restarts_during_a_run(own_servers):
    pg, redis, etcd = own_servers.postgres(), own_servers.redis(), own_servers.etcd()
    pg_url = pg.create_database()
    async with fleet(pg_url, redis.url, etcd.endpoint) as f:
        key = await admin_key(f)
        await f.replica("a")
        await f.replica("b")
        await f.node("n1", "a", "b")
        await f.node("n2", "b", "a")
        async with client(f.replicas["a"][1], key) as ca, client(f.replicas["b"][1], key) as cb:
            await wait_nodes(ca, 2)
            tasks = [await submit((ca, cb)[i % 2], "sleep:1") for i in range(4)]

            # PostgreSQL down: a clear 503 from either replica, not a hang; back: the run goes on
            await trio.to_thread.run_sync(pg.stop)
            for c in (ca, cb):
                with trio.fail_after(20):
                    r = await c.get("/v1/tasks")
                assert r.status_code == 503, r.text
            await trio.to_thread.run_sync(pg.start)
            tasks += [await _submit_when_up(c, "sleep:1") for c in (ca, cb)]

            # Redis down (rate limits and notifications): an answer at once, 201 or a clear 503
            await trio.to_thread.run_sync(redis.stop)
            for c in (ca, cb):
                with trio.fail_after(20):
                    r = await c.post("/v1/tasks", json={"prompt": "sleep:1"})
                assert r.status_code in (201, 503), r.text
                if r.status_code == 201:
                    tasks.append(r.json()["id"])
            await trio.to_thread.run_sync(redis.start)
            tasks += [await _submit_when_up(c, "sleep:1") for c in (ca, cb)]

            # etcd down: the replicas keep serving what they hold; back: leases and the lead again
            await trio.to_thread.run_sync(etcd.stop)
            tasks += [await _submit_when_up(c, "sleep:1") for c in (ca, cb)]
            await trio.to_thread.run_sync(etcd.start)

            done = await finished(ca, tasks, timeout=180)
            assert {t["state"] for t in done.values()} == {"succeeded"}, [
                (t["id"], t["state"], t["reason"], t["message"]) for t in done.values() if t["state"] != "succeeded"
            ]
            await wait_nodes(cb, 2)  # both nodes are in the registry again
            assert sum(r["leader"] for r in (await cluster(cb))["replicas"]) == 1


async def test_a_node_stopped_past_its_lease_is_fenced_when_it_resumes(pg_url, redis_server, etcd_server):
    async with fleet(pg_url, redis_server.url, etcd_server.endpoint) as f:
        key = await admin_key(f)
        await f.replica("a")
        await f.replica("b")
        await f.node("n1", "a", "b")
        await f.node("n2", "b", "a")
        async with client(f.replicas["b"][1], key) as c:
            await wait_nodes(c, 2)
            tid = await submit(c, "sleep:8")
            await until(lambda: _state(c, tid, "running"), timeout=60, interval=0.1)
            first = (await c.get(f"/v1/tasks/{tid}")).json()["node_id"]
            frozen = next(p for p in f.nodes.values() if _node_id(f, p) == first)
            frozen.signal(signal.SIGSTOP)  # a partition: alive, silent

            async def elsewhere() -> bool:
                t = (await c.get(f"/v1/tasks/{tid}")).json()
                return t["attempt"] == 2 and t["state"] == "running"

            await until(elsewhere, timeout=60, interval=0.1)
            frozen.signal(signal.SIGCONT)  # back: it still runs attempt 1, which is no longer its own
            await frozen.line(r"cancel|no longer assigned", timeout=60)
            done = (await finished(c, [tid], timeout=120))[tid]
            assert done["state"] == "succeeded" and done["attempt"] == 2 and done["node_id"] != first, done
            assert (await states_of(c, tid)).count("succeeded") == 1


async def _state(c: httpx.AsyncClient, tid: str, state: str) -> bool:
    r = await c.get(f"/v1/tasks/{tid}")
    return r.status_code == 200 and r.json()["state"] == state


def _node_id(f: Fleet, p: Proc) -> str:
    with open(os.path.join(f.tmp, p.name, "node_id")) as fh:
        return fh.read().strip()


async def _submit_when_up(c: httpx.AsyncClient, prompt: str) -> str:
    """A submission once the API answers again (a 503 while a dependency comes back is fine)."""
    out: list[str] = []

    async def accepted() -> bool:
        try:
            r = await c.post("/v1/tasks", json={"prompt": prompt})
        except httpx.HTTPError:
            return False
        if r.status_code == 201:
            out.append(r.json()["id"])
            return True
        assert r.status_code == 503, r.text
        return False

    await until(accepted, timeout=60, interval=0.2)
    return out[0]
