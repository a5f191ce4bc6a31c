"""The node gateway against an attacker: what it holds before authentication (frame limit,
handshake timeout, a cap on connections still authenticating) and what uploads make it hold
after (streamed to disk, only for the node's own tasks, removed when the node leaves).

The floods run against an orchestrator in its own process, whose memory (RSS) is measured."""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from marathon.store import artifacts
import trio.testing

from marathon.bus.memory import MemoryBus
from marathon.orchestrator.gateway import PREAUTH_MAX_FRAME, Gateway
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.tasks import TaskService
from marathon.protocol import messages as m
from marathon.protocol.auth import node_mac
from marathon.protocol.framing import FramedStream, encode_frame
from marathon.protocol.transports import open_stream
from marathon.store import open_store
from tests.harness import marathon_config, run_marathon, scratch_dir
from tests.polling import until

MiB = 1024 * 1024


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _env(**kw) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/")}
    env.update({f"MARATHON_{k.upper()}": str(v) for k, v in kw.items()})
    return env


async def _wait_for_line(path: str, pattern: str, timeout: float = 60):
    import re

    with trio.fail_after(timeout):
        while True:
            with open(path, errors="replace") as f:
                found = re.search(pattern, f.read())
            if found:
                return found
            await trio.sleep(0.05)


class Orchestrator:
    def __init__(self, proc, api: str, gateway: str, secret: str, data_dir: str, log: str):
        self.proc, self.api, self.gateway, self.secret, self.data_dir, self.log = (
            proc,
            api,
            gateway,
            secret,
            data_dir,
            log,
        )

    def rss(self) -> int:
        return _rss(self.proc.pid)


async def start_orchestrator(tmp: str, **settings) -> Orchestrator:
    data, log = os.path.join(tmp, "orch"), os.path.join(tmp, "orch.log")
    env = _env(data_dir=data, http_listen="tcp:127.0.0.1:0", gateway_listen="tcp:127.0.0.1:0",
               allow_registration="true", heartbeat_interval=0.5, **settings)  # fmt: skip
    with open(log, "wb") as f:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "marathon", "serve", "--role", "orchestrator"], env=env, stdout=f, stderr=f
        )
    api = (await _wait_for_line(log, r"API on (http://[\d.:]+)")).group(1)
    gateway = (await _wait_for_line(log, r"node gateway listening on (tcp:[\d.:]+)")).group(1)
    with open(os.path.join(data, "node_secret")) as f:
        secret = f.read().strip()
    return Orchestrator(proc, api, gateway, secret, data, log)


async def stop(proc) -> None:
    if proc.returncode is None:
        proc.send_signal(2)
        with trio.move_on_after(20):
            await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def secret_node(gateway: str, secret: str, node_id: str, slots: int = 1) -> FramedStream[Any]:
    fs: FramedStream[Any] = FramedStream(await open_stream(gateway), m.GatewayMessage)
    await fs.handshake("node", "test", initiator=True, timeout=5)
    challenge = await fs.receive()
    await fs.send(
        m.Authenticate(
            node_id=node_id,
            name=node_id,
            mac=node_mac(secret, challenge.nonce, node_id),
            capacity=m.Capacity(slots=slots),
        )
    )
    welcome = await fs.receive()
    assert isinstance(welcome, m.Welcome), welcome
    return fs


async def expect(fs: FramedStream[Any], kind, timeout: float = 10):
    with trio.fail_after(timeout):
        while True:
            msg = await fs.receive()
            if isinstance(msg, kind):
                return msg


async def raw_read_until_closed(stream, timeout: float) -> bytes:
    """What the gateway sends before it closes the connection (TooSlowError if it does not)."""
    got = b""
    with trio.fail_after(timeout):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return got
            if not chunk:
                return got
            got += chunk


# --------------------------------------------------------------------------- before authentication


async def test_an_oversized_frame_before_authentication_is_refused_at_its_header():
    tmp = scratch_dir()
    async with run_marathon(marathon_config(os.path.join(tmp, "data")), role="orchestrator") as mt:
        stream = await open_stream(mt.gateway)
        # an 8 MiB frame: the header says so; the gateway answers before the payload is in
        await stream.send_all(struct.pack(">I", 8 * MiB) + b"\0" * 65536)
        answer = await raw_read_until_closed(stream, timeout=10)
        assert b"frame_too_large" in answer and str(PREAUTH_MAX_FRAME).encode() in answer
        await stream.aclose()
        # a frame just over the limit inside the handshake is refused too; a real node still connects
        stream = await open_stream(mt.gateway)
        await stream.send_all(encode_frame(m.Hello(protocol=m.PROTOCOL_VERSION, role="node", version="x" * 70000)))
        assert b"frame_too_large" in await raw_read_until_closed(stream, timeout=10)
        fs = await secret_node(mt.gateway, mt.node_secret, "n-ok")
        await fs.aclose()


async def test_a_handshake_that_dribbles_is_cut_at_handshake_timeout(autojump_clock, tmp_path):
    config = marathon_config(str(tmp_path / "data"), handshake_timeout=10.0, connect_timeout=30.0)
    store = await open_store("sqlite", config.data_dir)
    try:
        gateway = Gateway(config, TaskService(store, MemoryBus(), config), NodeRegistry(), "s" * 32)
        client, server = trio.testing.memory_stream_pair()
        hello = encode_frame(m.Hello(protocol=m.PROTOCOL_VERSION, role="node"))
        ended = []

        async def dribble():  # a byte a second: every read makes progress, the handshake never ends
            for b in hello[:-1]:
                await client.send_all(bytes([b]))
                await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            start = trio.current_time()
            await gateway.handle(server)
            ended.append(trio.current_time() - start)
            nursery.cancel_scope.cancel()
        assert 10.0 <= ended[0] < 12.0
        assert gateway.unauthenticated == 0
        answer = b""
        with trio.move_on_after(1):
            while True:
                chunk = await client.receive_some(65536)
                if not chunk:
                    break
                answer += chunk
        assert b"no handshake within handshake_timeout" in answer
    finally:
        await store.close()


@pytest.mark.slow
async def test_connections_over_the_cap_are_closed_at_once():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), gateway_max_unauthenticated=8, handshake_timeout=60.0)
    async with run_marathon(config, role="orchestrator") as mt:
        held = [await open_stream(mt.gateway) for _ in range(8)]
        await until(lambda: mt.info.tasks is not None and _unauthenticated(mt) == 8, timeout=10)
        extra = [await open_stream(mt.gateway) for _ in range(20)]
        for s in extra:  # closed without a word, at once
            assert await raw_read_until_closed(s, timeout=5) == b""
        for s in held:  # the first ones are still waiting for their handshake
            with trio.move_on_after(0.2) as scope:
                await s.receive_some(1)
            assert scope.cancelled_caught
        for s in held + extra:
            await s.aclose()
        await until(lambda: _unauthenticated(mt) == 0, timeout=10)
        fs = await secret_node(mt.gateway, mt.node_secret, "n-after")  # room again
        await fs.aclose()


def _unauthenticated(mt) -> int:
    gw = _gateway_of(mt)
    return gw.unauthenticated


def _gateway_of(mt) -> Gateway:
    import gc

    return next(o for o in gc.get_objects() if isinstance(o, Gateway) and o.nodes is mt.info.nodes)


@pytest.mark.slow
async def test_unauthenticated_flood_keeps_the_orchestrator_small():
    tmp = scratch_dir()
    orch = await start_orchestrator(tmp, gateway_max_unauthenticated=64, handshake_timeout=30)
    try:
        await trio.sleep(1)  # let start-up settle before the baseline (not a synchronisation)
        base = orch.rss()
        streams = []
        sent = 0
        for _ in range(64):  # each one as much as it may send: a frame just under the pre-auth limit
            s = await open_stream(orch.gateway)
            await s.send_all(struct.pack(">I", PREAUTH_MAX_FRAME) + b"\1" * (PREAUTH_MAX_FRAME - 1))
            streams.append(s)
        for _ in range(32):  # and more, each with the start of an 8 MiB frame
            s = await open_stream(orch.gateway)
            try:
                await s.send_all(struct.pack(">I", 8 * MiB) + b"\2" * MiB)
                sent += MiB
            except (trio.BrokenResourceError, OSError):
                pass
            streams.append(s)
        await trio.sleep(1)
        peak = orch.rss()
        for s in streams:
            await s.aclose()
        grown = peak - base
        # issue 10 measured +225 MiB for 16 connections before the limits; 64 x 64 KiB is 4 MiB of buffers
        assert grown < 32 * MiB, f"RSS grew by {grown / MiB:.1f} MiB under the flood"
        print(f"unauthenticated flood: RSS {base / MiB:.1f} -> {peak / MiB:.1f} MiB")
    finally:
        await stop(orch.proc)


# --------------------------------------------------------------------------- uploads


@asynccontextmanager
async def _admin_client(orch: Orchestrator):
    async with httpx.AsyncClient(base_url=orch.api, timeout=30, trust_env=False) as client:
        creds = {"email": "ops@example.com", "password": "a long enough password"}
        r = await client.post("/v1/auth/register", json=creds)
        assert r.status_code in (200, 201), r.text
        r = await client.post("/v1/auth/login", json=creds)
        client.headers["Authorization"] = f"Bearer {r.json()['token']}"
        yield client


def chunks(task_id: str, attempt: int, data: bytes, seq: int, *, chunk: int = MiB, last: bool = True, **kw):
    digest = hashlib.sha256(data).digest()
    out = []
    for off in range(0, len(data), chunk):
        is_last = last and off + chunk >= len(data)
        seq += 1
        out.append(
            m.TaskBlob(
                task_id=task_id,
                node_seq=seq,
                name="bundle",
                offset=off,
                data=data[off : off + chunk],
                last=is_last,
                attempt=attempt,
                size=len(data) if is_last else -1,
                sha256=kw.get("sha256", digest) if is_last else b"",
            )
        )
    return out


async def test_uploads_only_for_the_nodes_own_tasks_and_checked_before_they_are_stored():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), heartbeat_interval=0.2)
    async with run_marathon(config, role="orchestrator") as mt:
        owner = await secret_node(mt.gateway, mt.node_secret, "n-owner")
        task = await mt.submit("x")
        await expect(owner, m.Assign)
        await owner.send(m.Accepted(task_id=task["id"], attempt=1))
        rogue = await secret_node(mt.gateway, mt.node_secret, "n-rogue")
        store = mt.info.tasks.store
        # another node uploads for the task: refused, nothing kept
        for msg in chunks(task["id"], 1, b"forged" * 1000, 0):
            await rogue.send(msg)
        await rogue.send(m.Heartbeat(capacity=m.Capacity(slots=1)))
        await expect(rogue, m.HeartbeatAck)
        assert await store.get_artifact(task["id"], "bundle") is None
        # the owner, for an attempt that is not the task's: refused
        for msg in chunks(task["id"], 7, b"old" * 1000, 10):
            await owner.send(msg)
        # the owner with a wrong hash: dropped
        for msg in chunks(task["id"], 1, b"x" * (3 * MiB), 20, sha256=b"\0" * 32):
            await owner.send(msg)
        await owner.send(m.Heartbeat(capacity=m.Capacity(slots=1)))
        await expect(owner, m.HeartbeatAck)
        assert await store.get_artifact(task["id"], "bundle") is None
        # the owner, right: stored
        good = os.urandom(2 * MiB + 5)
        for msg in chunks(task["id"], 1, good, 30):
            await owner.send(msg)
        await owner.send(m.Heartbeat(capacity=m.Capacity(slots=1)))
        await expect(owner, m.HeartbeatAck)
        found = await artifacts.manifest(store, task["id"], "bundle")  # stored in parts, read in parts
        assert isinstance(found, artifacts.Manifest) and found.size == len(good)
        assert b"".join([p async for p in artifacts.read_parts(store, task["id"], "bundle", found)]) == good
        r = await mt.client.get(f"/v1/tasks/{task['id']}/bundle")  # and streamed to a client whole
        assert r.status_code == 200 and r.content == good and r.headers["content-length"] == str(len(good))
        uploads = os.path.join(config.data_dir, "uploads")
        assert all(not files for _, _, files in os.walk(uploads))
        await rogue.aclose()
        await owner.aclose()


@pytest.mark.slow
async def test_abandoned_uploads_stay_on_disk_not_in_memory_and_are_removed_when_the_node_leaves():
    tmp = scratch_dir()
    orch = await start_orchestrator(tmp, node_grace=30)
    try:
        async with _admin_client(orch) as client:
            node = await secret_node(orch.gateway, orch.secret, "n-uploader")
            r = await client.post("/v1/tasks", json={"prompt": "x"})
            assert r.status_code == 201, r.text
            task_id = r.json()["id"]
            await expect(node, m.Assign)
            await node.send(m.Accepted(task_id=task_id, attempt=1))
            await trio.sleep(1)
            base = orch.rss()
            size = 160 * MiB
            block = os.urandom(MiB)
            for seq, off in enumerate(range(0, size, MiB), start=1):  # never the last chunk: abandoned half-way
                await node.send(
                    m.TaskBlob(task_id=task_id, node_seq=seq, name="bundle", offset=off, data=block, attempt=1)
                )
            await node.send(m.Heartbeat(capacity=m.Capacity(slots=1)))
            await expect(node, m.HeartbeatAck, timeout=60)
            peak = orch.rss()
            uploads = os.path.join(orch.data_dir, "uploads")
            on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(uploads) for f in fs)
            assert on_disk == size
            grown = peak - base
            assert grown < 48 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for a {size // MiB} MiB upload"
            print(f"abandoned 160 MiB upload: RSS {base / MiB:.1f} -> {peak / MiB:.1f} MiB")
            await node.aclose()  # the node leaves: its half-sent upload is deleted
            await until(lambda: all(not fs for _, _, fs in os.walk(uploads)), timeout=10)
    finally:
        await stop(orch.proc)


async def test_a_bundle_for_a_node_is_queued_at_its_pace():
    """Chunks of a resumed task's bundle wait to be queued while 8 MiB of them are queued for
    the node already: a large bundle never sits whole in the session's queue."""
    from marathon.orchestrator.nodes import CHUNK_BYTES, NodeRegistry, NodeSession

    written: list[int] = []
    highest = 0

    class SlowNode:
        async def send(self, msg):
            await trio.sleep(0.01)
            written.append(len(msg.data))

    session = NodeSession("n1", "n1", SlowNode(), m.Capacity(slots=1))  # type: ignore[arg-type]
    async with trio.open_nursery() as n:
        n.start_soon(session.write_queued)
        for i in range(40):
            assert await session.send_chunk(m.AssignBlob(task_id="t", name="bundle", offset=i * MiB, data=b"x" * MiB))
            highest = max(highest, session.queued_bytes)
        await trio.testing.wait_all_tasks_blocked()
        n.cancel_scope.cancel()
    assert highest <= CHUNK_BYTES + MiB
    # a node that goes away releases whoever waits to queue for it
    stuck = NodeSession("n2", "n2", SlowNode(), m.Capacity(slots=1))  # type: ignore[arg-type]
    stuck.queued_bytes = CHUNK_BYTES + 1
    registry = NodeRegistry()
    registry.attach(stuck)
    async with trio.open_nursery() as n:
        done = trio.Event()

        async def wait() -> None:
            await stuck.send_chunk(m.AssignBlob(task_id="t", name="bundle", offset=0, data=b"x"))
            done.set()

        n.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        registry.detach(stuck)
    assert done.is_set()
