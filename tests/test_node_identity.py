"""Node identity: join tokens, each node's own key, revocation, enrolled capacity.

Nodes here are scripted message by message (a rogue node does what it likes), except the
first test, where a real node process enrols and restarts against the orchestrator."""

from __future__ import annotations

import os
import stat
import sys
import time
from typing import Any

import httpx
import msgspec
import pytest
import trio

from marathon.protocol import messages as m
from marathon.protocol.auth import (
    join_mac,
    new_private_key,
    node_mac,
    node_signature,
    orchestrator_mac,
    public_key,
    split_token,
    token_hash,
)
from marathon.protocol.framing import FramedStream
from marathon.protocol.transports import open_stream
from tests.harness import claude_bin, marathon_config, run_marathon, scratch_dir
from tests.polling import until


class KeyNode:
    """A node that signs with its own key (and enrols with a join token when it has one)."""

    def __init__(self, gateway: str, node_id: str, *, token: str = "", key: bytes | None = None):
        self.gateway, self.node_id, self.token = gateway, node_id, token
        self.key = key or new_private_key()
        self.server_key = b""
        self.seq = 0
        self._fs: FramedStream[Any] | None = None

    @property
    def fs(self) -> FramedStream[Any]:
        assert self._fs is not None
        return self._fs

    async def connect(self, slots: int = 1, warm: int = 0, running: dict[str, int] | None = None) -> m.Welcome:
        """Welcome, or AuthError-like ``m.Error`` raised as RuntimeError(message)."""
        self._fs = FramedStream(await open_stream(self.gateway), m.GatewayMessage)
        await self.fs.handshake("node", "test", initiator=True, timeout=5)
        challenge = await self.fs.receive()
        pub = public_key(self.key)
        auth = m.Authenticate(
            node_id=self.node_id,
            name=self.node_id,
            mac=b"",
            capacity=m.Capacity(slots=slots, warm=warm),
            running=running or {},
            nonce=(nonce := os.urandom(32)),
            public_key=pub,
            signature=node_signature(self.key, challenge.nonce, self.node_id),
        )
        if self.token and not self.server_key:
            tid = split_token(self.token)
            assert tid is not None
            auth = msgspec.structs.replace(
                auth, join_id=tid[0], join_mac=join_mac(self.token, challenge.nonce, self.node_id, pub)
            )
        await self.fs.send(auth)
        with trio.fail_after(10):
            welcome = await self.fs.receive()
        if isinstance(welcome, m.Error):
            raise RuntimeError(f"{welcome.code}: {welcome.message}")
        assert isinstance(welcome, m.Welcome)
        key = self.server_key.hex() if self.server_key else token_hash(self.token)
        assert welcome.mac == orchestrator_mac(key, nonce, self.node_id)  # the orchestrator proved itself
        if welcome.server_key:
            self.server_key = welcome.server_key
        return welcome

    async def expect(self, kind, timeout: float = 10):
        with trio.fail_after(timeout):
            while True:
                msg = await self.fs.receive()
                if isinstance(msg, kind):
                    return msg

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def close(self) -> None:
        await self.fs.aclose()


@pytest.fixture
async def orchestrator():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), node_grace=30.0, heartbeat_interval=0.2, assign_timeout=5.0)
    async with run_marathon(config, role="orchestrator") as mt:
        yield mt


def token_id(token: str) -> str:
    parts = split_token(token)
    assert parts is not None
    return parts[0]


async def join_token(mt, **body) -> str:
    r = await mt.client.post("/v1/nodes/join-tokens", json=body)
    assert r.status_code == 201, r.text
    return r.json()["token"]


async def node_list(mt) -> dict[str, dict]:
    r = await mt.client.get("/v1/nodes")
    r.raise_for_status()
    return {n["id"]: n for n in r.json()["nodes"]}


def _env(**kw) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/")}
    env.update({f"MARATHON_{k.upper()}": str(v) for k, v in kw.items()})
    return env


async def _run_cli(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await trio.run_process(
        [sys.executable, "-m", "marathon", *args], env=env, capture_stdout=True, capture_stderr=True, check=False
    )
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@pytest.mark.slow
async def test_a_node_process_joins_with_a_token_and_comes_back_with_its_own_key(orchestrator):
    mt = orchestrator
    tmp = scratch_dir()
    node_data = os.path.join(tmp, "node")
    admin = mt.client.headers["Authorization"].removeprefix("Bearer ")
    code, out, err = await _run_cli(
        ["nodes", "join-token", "--ttl", "10m", "--max-slots", "3"], _env(url=mt.url, token=admin)
    )
    assert code == 0, err
    token = out.strip()
    assert token.startswith("mjt_") and "at most 3 slot(s)" in err
    stored = await mt.info.tasks.store.get_join_token(token_id(token))
    assert stored is not None and token not in repr(stored) and stored.token_hash == token_hash(token)

    node_env = dict(data_dir=node_data, orchestrator=mt.gateway, node_id="n-joined", slots=5, heartbeat_interval=0.2,
                    bwrap="auto", claude_bin=claude_bin(),
                    anthropic_api_key="sk-ant-test-xxxxxxxxxxxxxxxxxxxxxxxx")  # fmt: skip
    log_path = os.path.join(tmp, "node.log")

    async def run_node(env: dict[str, str], up: bool) -> None:
        with open(log_path, "ab") as f:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "marathon", "serve", "--role", "node"], env=env, stdout=f, stderr=f
            )
        try:
            if up:
                try:
                    await until(lambda: _connected(mt, "n-joined"), timeout=60)
                except trio.TooSlowError:
                    with open(log_path) as f:
                        raise AssertionError(f"the node did not connect: {f.read()[-3000:]}") from None
        finally:
            proc.send_signal(2)
            with trio.move_on_after(20):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    await run_node(_env(**node_env, join_token=token), up=True)
    nodes = await node_list(mt)
    assert nodes["n-joined"]["slots"] == 3  # claimed 5, enrolled for 3
    cred_path = os.path.join(node_data, "node_credential")
    assert stat.S_IMODE(os.stat(cred_path).st_mode) == 0o600
    with open(cred_path) as f:
        assert token not in f.read()
    spent = await mt.info.tasks.store.get_join_token(token_id(token))
    assert spent.used_by == "n-joined"
    enrolled = await mt.info.tasks.store.get_node_credential("n-joined")
    assert enrolled is not None and enrolled.max_slots == 3

    await until(lambda: not _connected_now(mt, "n-joined"), timeout=30)
    await run_node(_env(**node_env), up=True)  # restarted without the token: its own key
    with open(log_path) as f:
        log_text = f.read()
    assert token not in log_text  # the token is never logged


def _connected_now(mt, node_id: str) -> bool:
    s = mt.info.nodes.get(node_id)
    return s is not None and s.connected


async def _connected(mt, node_id: str) -> bool:
    return _connected_now(mt, node_id)


async def test_a_spent_or_expired_or_unknown_token_is_refused_with_a_clear_error(orchestrator):
    mt = orchestrator
    token = await join_token(mt, ttl=600, max_slots=1)
    first = KeyNode(mt.gateway, "n-first", token=token)
    await first.connect()
    again = KeyNode(mt.gateway, "n-second", token=token)
    with pytest.raises(RuntimeError, match=r"unauthorized: join token \w+ was used already \(by node n-first\)"):
        await again.connect()

    identities = mt.info.tasks  # the API refuses a ttl below a second: make a stale one directly
    from marathon.orchestrator.identity import NodeIdentities

    ids = NodeIdentities(identities.store, "")
    stale, _ = await ids.create_join_token(ttl=60, max_slots=1, created_by="test", now=time.time() - 120)
    with pytest.raises(RuntimeError, match=r"unauthorized: join token \w+ expired at"):
        await KeyNode(mt.gateway, "n-late", token=stale).connect()

    tid = token_id(token)
    with pytest.raises(RuntimeError, match="unauthorized: unknown join token"):  # a forged secret part
        await KeyNode(mt.gateway, "n-forged", token=f"mjt_{tid}.{'x' * 40}").connect()
    with pytest.raises(RuntimeError, match="not enrolled: start it with a join token"):
        await KeyNode(mt.gateway, "n-nobody").connect()
    assert "n-second" not in await node_list(mt) and "n-late" not in await node_list(mt)

    r = await mt.client.post("/v1/nodes/join-tokens", json={"ttl": 0})
    assert r.status_code == 400 and "ttl" in r.text
    await first.close()


async def test_a_node_cannot_take_another_nodes_id(orchestrator):
    mt = orchestrator
    owner = KeyNode(mt.gateway, "n-owner", token=await join_token(mt))
    await owner.connect()
    # a rogue node with a valid token of its own claims the id
    rogue = KeyNode(mt.gateway, "n-owner", token=await join_token(mt))
    with pytest.raises(RuntimeError, match="n-owner is enrolled with another key: it cannot be taken"):
        await rogue.connect()
    # nor with the shared node secret
    fs: FramedStream[Any] = FramedStream(await open_stream(mt.gateway), m.GatewayMessage)
    await fs.handshake("node", "test", initiator=True, timeout=5)
    challenge = await fs.receive()
    await fs.send(
        m.Authenticate(
            node_id="n-owner",
            name="rogue",
            mac=node_mac(mt.node_secret, challenge.nonce, "n-owner"),
            capacity=m.Capacity(slots=1),
        )
    )
    refused = await fs.receive()
    assert isinstance(refused, m.Error) and "only its own key can take it" in refused.message
    await fs.aclose()
    assert _connected_now(mt, "n-owner")  # the real one was not replaced
    # the owner itself reconnecting with its key replaces its old connection, as before
    old = owner.fs
    await owner.connect()
    with trio.fail_after(5):
        with pytest.raises(Exception):  # noqa: B017  the old connection is closed
            while True:
                await old.receive()
    await owner.close()


async def test_revoke_cuts_the_node_off_and_its_tasks_go_back_as_a_lost_nodes(orchestrator):
    mt = orchestrator
    node = KeyNode(mt.gateway, "n-revoked", token=await join_token(mt))
    await node.connect()
    task = await mt.submit("x")
    assign = await node.expect(m.Assign)
    await node.fs.send(m.Accepted(task_id=task["id"], attempt=1))
    await node.fs.send(
        m.TaskEvent(task_id=task["id"], node_seq=node.next_seq(), event=m.StateEvent(state="running"), attempt=1)
    )
    await mt.wait_state(task["id"], {"running"})
    assert assign.github_token is None

    r = await mt.client.post("/v1/nodes/n-revoked/revoke")
    assert r.status_code == 200 and r.json() == {"id": "n-revoked", "revoked": True, "disconnected": True}
    with trio.fail_after(5):  # told, then disconnected, at once (node_grace is 30 s here)
        err = await node.expect(m.Error)
    assert "revoked" in err.message
    # the task is given back without waiting for node_grace
    await mt.events(task["id"], until=lambda e: e["event"] == "state" and e["data"].get("reason") == "node_lost")
    # and the node is refused from now on
    with pytest.raises(RuntimeError, match="n-revoked was revoked by an administrator"):
        await node.connect()
    other = KeyNode(mt.gateway, "n-other", token=await join_token(mt))
    await other.connect()
    again = await other.expect(m.Assign)
    assert again.task.task_id == task["id"] and again.task.attempt == 2
    await other.close()
    r = await mt.client.post("/v1/nodes/n-nonexistent/revoke")
    assert r.status_code == 404


@pytest.mark.slow
async def test_claimed_capacity_is_capped_at_the_enrolled_maximum(orchestrator):
    mt = orchestrator
    node = KeyNode(mt.gateway, "n-greedy", token=await join_token(mt, max_slots=2))
    welcome = await node.connect(slots=500, warm=500)
    assert welcome.max_slots == 2
    shown = (await node_list(mt))["n-greedy"]
    assert shown["slots"] == 2 and shown["warm"] == 2
    await node.fs.send(m.Heartbeat(capacity=m.Capacity(slots=500, warm=500)))
    tasks = [await mt.submit(f"t{i}") for i in range(5)]
    got = {(await node.expect(m.Assign)).task.task_id for _ in range(2)}
    assert got <= {t["id"] for t in tasks}
    with trio.move_on_after(1.5):  # several scheduler passes (heartbeats every 0.2 s)
        extra = await node.expect(m.Assign, timeout=2)
        pytest.fail(f"a third assignment to a node enrolled for 2 slots: {extra.task.task_id}")
    assert (await node_list(mt))["n-greedy"]["slots"] == 2
    await node.close()


async def test_join_token_and_revoke_are_for_administrators(orchestrator):
    mt = orchestrator
    await mt.info.accounts.register("user@example.com", "a long enough password", by_admin=True)
    r = await mt.client.post("/v1/auth/login", json={"email": "user@example.com", "password": "a long enough password"})
    assert r.status_code == 200, r.text
    user = {"Authorization": f"Bearer {r.json()['token']}"}
    async with httpx.AsyncClient(base_url=mt.url, trust_env=False, headers=user) as client:
        assert (await client.post("/v1/nodes/join-tokens", json={})).status_code == 403
        assert (await client.post("/v1/nodes/x/revoke")).status_code == 403


async def test_nodes_list_shows_users_only_their_own_tasks_and_no_addresses(orchestrator):
    mt = orchestrator
    node = KeyNode(mt.gateway, "n-shared", token=await join_token(mt, max_slots=2))
    await node.connect(slots=2)
    await mt.info.accounts.register("alice@example.com", "a long enough password", by_admin=True)
    await mt.info.accounts.register("bob@example.com", "a long enough password", by_admin=True)

    async def login(email: str) -> httpx.AsyncClient:
        r = await mt.client.post("/v1/auth/login", json={"email": email, "password": "a long enough password"})
        assert r.status_code == 200, r.text
        return httpx.AsyncClient(
            base_url=mt.url, trust_env=False, headers={"Authorization": f"Bearer {r.json()['token']}"}
        )

    async with await login("alice@example.com") as alice, await login("bob@example.com") as bob:
        r = await alice.post("/v1/tasks", json={"prompt": "alice's"})
        a_task = r.json()["id"]
        r = await bob.post("/v1/tasks", json={"prompt": "bob's"})
        b_task = r.json()["id"]
        for _ in range(2):
            assign = await node.expect(m.Assign)
            await node.fs.send(m.Accepted(task_id=assign.task.task_id, attempt=1))
        admin_view = (await node_list(mt))["n-shared"]
        assert sorted(admin_view["tasks"]) == sorted([a_task, b_task]) and admin_view["peer"].startswith("127.0.0.1:")
        a_view = {n["id"]: n for n in (await alice.get("/v1/nodes")).json()["nodes"]}["n-shared"]
        assert a_view["tasks"] == [a_task] and "peer" not in a_view
        assert a_view["slots"] == 2 and a_view["active"] == 2  # capacity is for everyone
        b_view = {n["id"]: n for n in (await bob.get("/v1/nodes")).json()["nodes"]}["n-shared"]
        assert b_view["tasks"] == [b_task] and "peer" not in b_view
    await node.close()


async def test_an_enrolment_whose_answer_was_lost_completes_on_the_next_try_and_revoked_ids_can_rejoin(orchestrator):
    mt = orchestrator
    token = await join_token(mt)
    node = KeyNode(mt.gateway, "n-retry", token=token)
    first = await node.connect()
    assert len(first.server_key) == 32
    await node.close()
    node.server_key = b""  # as if the Welcome never arrived: the same key and the same (spent) token again
    again = await node.connect()
    assert again.server_key == first.server_key
    await node.close()
    # but the spent token enrols no other key under that id
    with pytest.raises(RuntimeError, match="enrolled with another key"):
        await KeyNode(mt.gateway, "n-retry", token=token).connect()
    # revoked, then enrolled again with a new token (an administrator's consent)
    assert (await mt.client.post("/v1/nodes/n-retry/revoke")).json()["revoked"] is True
    fresh = KeyNode(mt.gateway, "n-retry", token=await join_token(mt))
    await fresh.connect()
    assert _connected_now(mt, "n-retry")
    await fresh.close()
