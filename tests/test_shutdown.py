"""SIGTERM: every role stops as cancellation, with its cleanup done, and loses no task.

The daemons run as real processes (``python -m marathon serve``) and get a real SIGTERM while
tasks run (the real Claude Code CLI against the fake API).  A node drains: what runs gets
``drain_timeout``, then it is stopped with reason ``node_shutdown`` and queued again at once, the
attempt not counted (``max_attempts = 1`` here: a counted attempt would fail the task).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import asynccontextmanager

import httpx
import msgspec
import pytest
import trio

from marathon.cli import credentials
from marathon.cli.serve import make_backend
from marathon.node.service import serve_node
from tests import fake_anthropic as fa
from tests.harness import TEST_KEY, alive, claude_bin, descendants, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow

DRAIN = 2.0  # drain_timeout of the daemons under test
EXIT_BOUND = 45.0  # beyond drain_timeout: stopping the agent (10 s at most), cleanup, the HTTP drain
HANG, SLEEP = "TASK-HANG", "TASK-SLEEP"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Script:
    """The fake API's answers by task: a HANG task waits on its first request until its sandbox
    is killed, and is done at once when it runs again; a SLEEP task runs a 3 s command first."""

    def __init__(self) -> None:
        self.hung = trio.Event()
        self.hangs = 0

    def __call__(self, body, i):
        first = json.dumps(body.get("messages", [])[:1])
        if HANG in first:
            if self.hangs == 0:
                self.hangs += 1
                self.hung.set()
                return fa.hang()
            return fa.text("done after the restart")
        if SLEEP in first:
            return [fa.tool_use("Bash", {"command": "sleep 3"}), fa.text("slept")][min(i, 1)]
        return fa.text("ok")


def daemon_env(tmp: str, fake_url: str, **settings) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": tmp,
        "XDG_CONFIG_HOME": os.environ["XDG_CONFIG_HOME"],  # where `all` saves the local admin's key
        "MARATHON_DATA_DIR": os.path.join(tmp, "data"),
        "MARATHON_ANTHROPIC_API_KEY": TEST_KEY,
        "MARATHON_ANTHROPIC_BASE_URL": fake_url,
        "MARATHON_CLAUDE_BIN": claude_bin(),
        "MARATHON_BWRAP": "required",
        "MARATHON_DRAIN_TIMEOUT": str(DRAIN),
        "MARATHON_MAX_ATTEMPTS": "1",
        "MARATHON_HEARTBEAT_INTERVAL": "0.5",
        "MARATHON_LOG_LEVEL": "debug",
    }
    env.update({f"MARATHON_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Daemon:
    """A ``marathon serve`` process; its output is kept, and searchable as it arrives."""

    def __init__(self, proc: trio.Process):
        self.proc = proc
        self.out = bytearray()
        self._more = trio.Event()
        self.eof = False

    def output(self) -> str:
        return self.out.decode(errors="replace")

    async def read_output(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.receive_some(65536):
            self.out += chunk
            self._more.set()
            self._more = trio.Event()
        self.eof = True
        self._more.set()

    async def wait_for(self, text: str, timeout: float = 60) -> None:
        """Until the process has printed ``text``."""
        with trio.fail_after(timeout):
            while text.encode() not in self.out:
                assert not self.eof, f"exited without printing {text!r}: " + self.output()[-3000:]
                await self._more.wait()

    async def sigterm(self) -> int:
        """SIGTERM, then wait for the exit (bounded); the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(DRAIN + EXIT_BOUND):
            return await self.proc.wait()


@asynccontextmanager
async def daemon(role: str, env: dict[str, str], tmp: str):
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "marathon", "serve", "--role", role],
        env=env,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    d = Daemon(proc)
    async with trio.open_nursery() as n:
        n.start_soon(d.read_output)
        try:
            yield d
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await proc.wait()
            n.cancel_scope.cancel()


def admin_client(url: str) -> httpx.AsyncClient:
    saved = credentials.load(url)
    assert saved, f"no saved credentials for {url}"
    return httpx.AsyncClient(
        base_url=url, trust_env=False, timeout=30, headers={"Authorization": f"Bearer {saved['token']}"}
    )


async def wait_until(client: httpx.AsyncClient, task_id: str, pred, timeout: float = 120) -> dict:
    """Follow the task's events until ``pred(task)`` holds (checked at every event and reconnect)."""
    with trio.fail_after(timeout):
        while True:
            task = (await client.get(f"/v1/tasks/{task_id}")).json()
            if pred(task):
                return task
            try:
                async with client.stream(
                    "GET", f"/v1/tasks/{task_id}/events", params={"follow": "1"}, timeout=httpx.Timeout(30, read=2)
                ) as resp:
                    async for _ in resp.aiter_lines():
                        break
            except httpx.TimeoutException:
                pass


def leftovers(pids: set[int], data_dir: str) -> list[str]:
    out = [f"process {p}" for p in alive(pids)]
    sandboxes = os.path.join(data_dir, "sandboxes")
    if os.path.isdir(sandboxes):
        out += [f"sandbox dir {d}" for d in os.listdir(sandboxes)]
    with open("/proc/self/mountinfo") as f:
        out += [f"mount {line.split()[4]}" for line in f if data_dir in line]
    return out


class Follower:
    """An SSE client of one task: reads until the stream ends, remembering what it saw."""

    def __init__(self, url: str, token: str, task_id: str):
        self.url, self.token, self.task_id = url, token, task_id
        self.ids: list[int] = []
        self.events: list[tuple[int, str, dict]] = []
        self.raw_tail = ""
        self.ended_cleanly = trio.Event()

    async def follow(self, after: int = 0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        if after:
            headers["Last-Event-ID"] = str(after)
        self.ended_cleanly = trio.Event()
        async with (
            httpx.AsyncClient(base_url=self.url, trust_env=False) as client,
            client.stream(
                "GET", f"/v1/tasks/{self.task_id}/events", headers=headers, timeout=httpx.Timeout(30, read=None)
            ) as resp,
        ):
            resp.raise_for_status()
            task_status.started()
            ev: dict = {}
            async for line in resp.aiter_lines():  # raises if the stream is cut rather than ended
                self.raw_tail = (self.raw_tail + line + "\n")[-500:]
                if line == "" and "id" in ev:
                    self.ids.append(ev["id"])
                    self.events.append((ev["id"], ev["event"], json.loads(ev["data"])))
                    ev = {}
                elif line.startswith("id: "):
                    ev["id"] = int(line[4:])
                elif line.startswith("event: "):
                    ev["event"] = line[7:]
                elif line.startswith("data: "):
                    ev["data"] = line[6:]
        self.ended_cleanly.set()


async def test_sigterm_to_role_all_drains_requeues_and_the_task_finishes_after_restart():
    tmp = scratch_dir()
    script = Script()
    http, gw = free_port(), free_port()
    async with fa.open_fake_anthropic(script) as fake:
        env = daemon_env(
            tmp, fake.url, http_listen=f"tcp:127.0.0.1:{http}", gateway_listen=f"tcp:127.0.0.1:{gw}", node_grace=600
        )
        url = f"http://127.0.0.1:{http}"
        data_dir = env["MARATHON_DATA_DIR"]
        async with daemon("all", env, tmp) as first:
            await first.wait_for("marathon all: API on")
            async with admin_client(url) as client:
                r = await client.post("/v1/tasks", json={"prompt": f"{HANG}: wait for the API"})
                assert r.status_code == 201, r.text
                task_id = r.json()["id"]
                with trio.fail_after(90):
                    await script.hung.wait()  # Claude Code waits on the API: the task runs
                pids = descendants(first.proc.pid)
                assert pids, "the sandbox's processes"
                assert await first.sigterm() == 0, first.output()[-3000:]
        assert leftovers(pids, data_dir) == [], first.output()[-3000:]
        out = first.output()
        assert "SIGTERM: shutting down" in out and f"stopping 1 task(s) ({'node_shutdown'})" in out

        async with daemon("all", env, tmp) as second:
            await second.wait_for("marathon all: API on")
            async with admin_client(url) as client:
                final = await wait_until(client, task_id, lambda t: t["terminal"])
                assert final["state"] == "succeeded", (final, second.output()[-3000:])
                assert final["attempt"] == 2 and final["free_attempts"] == 1
                assert final["final_text"] == "done after the restart"
                evs = (await client.get(f"/v1/tasks/{task_id}/events", params={"follow": "0"})).text
                assert '"reason":"node_shutdown"' in evs
            assert await second.sigterm() == 0


async def test_sigterm_to_role_node_lets_tasks_finish_within_drain_then_requeues_the_rest():
    tmp = scratch_dir()
    script = Script()
    async with fa.open_fake_anthropic(script) as fake:
        # a node_grace longer than the test: a requeue seen here is the at-once one, not node loss
        config = marathon_config(os.path.join(tmp, "orch"), anthropic_base_url=fake.url, node_grace=600, max_attempts=1)
        async with run_marathon(config, role="orchestrator") as mt:
            env = daemon_env(
                tmp,
                fake.url,
                orchestrator=mt.gateway,
                node_secret=mt.node_secret,
                node_name="n-sigterm",
                slots=2,
                drain_timeout=8,
            )
            data_dir = env["MARATHON_DATA_DIR"]
            async with daemon("node", env, tmp) as node:
                await node.wait_for("connected to the orchestrator")
                hang = await mt.submit(f"{HANG}: wait for the API")
                sleeper = await mt.submit(f"{SLEEP}: run a command, then answer")
                with trio.fail_after(90):
                    await script.hung.wait()
                await mt.wait_state(sleeper["id"], {"running"})
                pids = descendants(node.proc.pid)
                node.proc.send_signal(signal.SIGTERM)
                # it says it drains: the orchestrator gives it nothing new
                nodes = await wait_nodes(mt, lambda n: n and n[0]["draining"])
                assert nodes[0]["drain"] == "node"
                with trio.fail_after(env_float(env, "MARATHON_DRAIN_TIMEOUT") + EXIT_BOUND):
                    assert await node.proc.wait() == 0, node.output()[-3000:]
            assert leftovers(pids, data_dir) == [], node.output()[-3000:]
            done = await mt.task(sleeper["id"])  # it finished within drain_timeout
            assert done["state"] == "succeeded" and done["attempt"] == 1, done
            requeued = await mt.task(hang["id"])  # stopped after it, and queued again at once
            assert requeued["state"] == "queued" and requeued["reason"] == "node_shutdown", requeued
            assert requeued["free_attempts"] == 1

            async with trio.open_nursery() as n:  # the next node (here in this process) runs it
                cfg = msgspec.structs.replace(
                    config, data_dir=os.path.join(tmp, "node2"), node_name="n-next", orchestrator=mt.gateway
                )
                await n.start(serve_node, cfg, make_backend(cfg), mt.node_secret)
                final = await mt.finish(hang["id"], timeout=120)
                n.cancel_scope.cancel()
            assert final["state"] == "succeeded" and final["attempt"] == 2, final


async def test_sigterm_to_role_orchestrator_ends_event_streams_cleanly_and_they_resume():
    tmp = scratch_dir()
    asked = trio.Event()

    def script(body, i):
        if i == 0:
            asked.set()
            return fa.tool_use("Bash", {"command": "sleep 6"})
        return fa.text("finished while the orchestrator restarted")

    http, gw = free_port(), free_port()
    async with fa.open_fake_anthropic(script) as fake:
        env = daemon_env(
            tmp, fake.url, http_listen=f"tcp:127.0.0.1:{http}", gateway_listen=f"tcp:127.0.0.1:{gw}", node_grace=60
        )
        url = f"http://127.0.0.1:{http}"
        # the first administrator is made where the orchestrator's configuration is
        made = await trio.run_process(
            [sys.executable, "-m", "marathon", "admin", "create-user", "a@example.com", "--admin", "--password-stdin"],
            env=env,
            cwd=tmp,
            stdin=b"password123\n",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        async with daemon("orchestrator", env, tmp) as orch:
            await orch.wait_for("marathon orchestrator: API on")
            async with httpx.AsyncClient(base_url=url, trust_env=False) as anon:
                r = await anon.post("/v1/auth/login", json={"email": "a@example.com", "password": "password123"})
                token = r.json()["token"]
            with open(os.path.join(env["MARATHON_DATA_DIR"], "node_secret")) as f:  # noqa: ASYNC230
                secret = f.read().strip()
            async with trio.open_nursery() as nodes:
                cfg = marathon_config(
                    os.path.join(tmp, "node"),
                    anthropic_base_url=fake.url,
                    orchestrator=f"tcp:127.0.0.1:{gw}",
                    node_name="n-stays",
                )
                svc = await nodes.start(serve_node, cfg, make_backend(cfg), secret)
                with trio.fail_after(30):
                    await svc.connected.wait()
                auth = {"Authorization": f"Bearer {token}"}
                async with httpx.AsyncClient(base_url=url, trust_env=False, headers=auth) as client:
                    r = await client.post("/v1/tasks", json={"prompt": "sleep a little"})
                    task_id = r.json()["id"]
                follower = Follower(url, token, task_id)
                async with trio.open_nursery() as n:
                    await n.start(follower.follow)
                    with trio.fail_after(90):
                        await asked.wait()
                    assert await orch.sigterm() == 0, orch.output()[-3000:]
                    with trio.fail_after(10):
                        await follower.ended_cleanly.wait()  # the stream ended, it was not cut
                assert "retry: 1000" in follower.raw_tail and "resume with Last-Event-ID" in follower.raw_tail
                assert follower.ids, "events before the shutdown"

                async with daemon("orchestrator", env, tmp) as orch2:
                    await orch2.wait_for("marathon orchestrator: API on")
                    async with trio.open_nursery() as n:
                        n.start_soon(follower.follow, follower.ids[-1])
                        with trio.fail_after(120):
                            await follower.ended_cleanly.wait()
                    async with httpx.AsyncClient(base_url=url, trust_env=False, headers=auth) as client:
                        final = (await client.get(f"/v1/tasks/{task_id}")).json()
                        full = (await client.get(f"/v1/tasks/{task_id}/events", params={"follow": "0"})).text
                    assert final["state"] == "succeeded" and final["attempt"] == 1, (final, orch2.output()[-3000:])
                    # across the restart the follower missed nothing and saw nothing twice
                    assert follower.ids == list(range(1, len(follower.ids) + 1))
                    assert full.count("\nid: ") + full.startswith("id: ") == len(follower.ids)
                    assert await orch2.sigterm() == 0
                nodes.cancel_scope.cancel()


def env_float(env: dict[str, str], key: str) -> float:
    return float(env[key])


async def wait_nodes(mt, pred, timeout: float = 30) -> list[dict]:
    with trio.fail_after(timeout):
        while not pred(nodes := (await mt.client.get("/v1/nodes")).json()["nodes"]):  # noqa: ASYNC110
            await trio.sleep(0.05)  # a heartbeat carries it: no event to wait on from here
    return nodes
