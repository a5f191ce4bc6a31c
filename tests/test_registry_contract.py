"""The registry contract (leases, membership, election, views), run against the in-process
registry (on trio's virtual clock) and etcd (a real etcd server the harness starts).

Each test opens several registries on one cluster, one per "replica".  A replica is
partitioned by making its every new request fail (memory: ``kv.partitioned``; etcd: an
httpx transport that refuses to connect): it can no longer renew its leases, as when it
dies or loses its network.
"""

import secrets
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
import pytest
import trio
from trio.testing import MockClock

from marathon.errors import Unavailable
from marathon.registry.core import KVMemberView, KVRegistry, step_down_margin
from marathon.registry.etcd import open_etcd_registry
from marathon.registry.memory import MemoryKVServer, open_memory_registry
from tests.polling import until

TTL = 3
BOUND = 30.0  # hang detector


class CuttableTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.cut = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut:
            raise httpx.ConnectError("partitioned (test)", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Cluster:
    def __init__(self, kind: str, *, server=None, endpoint=None):
        self.kind = kind
        self.server: MemoryKVServer | None = server
        self.endpoint = endpoint
        self.prefix = f"/test-{secrets.token_hex(4)}/"
        # how late a TTL-driven change may come: etcd checks expiries every ~0.5 s
        self.slack = 0.01 if kind == "memory" else 1.5
        self._cuts: dict[int, CuttableTransport] = {}

    @asynccontextmanager
    async def replica(self):
        if self.kind == "memory":
            async with open_memory_registry(self.server, prefix=self.prefix) as reg:
                yield reg
        else:
            t = CuttableTransport()
            async with open_etcd_registry([self.endpoint], prefix=self.prefix, timeout=2, transport=t) as reg:
                self._cuts[id(reg)] = t
                yield reg

    def partition(self, reg: KVRegistry, on: bool = True) -> None:
        if self.kind == "memory":
            reg.kv.partitioned = on  # type: ignore[attr-defined]
        else:
            self._cuts[id(reg)].cut = on

    async def compact(self, reg: KVRegistry, revision: int) -> None:
        if self.server is not None:
            self.server.compact(revision)
        else:
            await reg.kv.compact(revision)  # type: ignore[attr-defined]


@pytest.fixture(params=["memory", "etcd"])
def kind(request):
    return request.param


@pytest.fixture
def clock(kind):
    """Virtual time for the in-process registry (pytest-trio runs the test on this clock)."""
    return MockClock(autojump_threshold=0) if kind == "memory" else None


@pytest.fixture
async def cluster(kind, clock, request):
    if kind == "etcd":
        yield Cluster("etcd", endpoint=request.getfixturevalue("etcd_server").endpoint)
        return
    server = MemoryKVServer()
    async with trio.open_nursery() as n:
        await n.start(server.serve)
        yield Cluster("memory", server=server)
        n.cancel_scope.cancel()


@asynccontextmanager
async def replicas(cluster, n):
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(cluster.replica()) for _ in range(n)]


# ---------------------------------------------------------------------- leases and records


async def test_records_live_with_their_lease(cluster, clock):
    async with replicas(cluster, 2) as (a, b):
        async with a.lease(TTL) as lease:
            await lease.put("replica", "r1", b'{"url": "http://a"}')
            await lease.put("node", "n1", b"{}")
            members, rev = await b.members("replica")
            assert list(members) == ["r1"] and members["r1"].data == b'{"url": "http://a"}' and rev > 0
            assert members["r1"].lease == lease.id and lease.alive
            await lease.put("replica", "r1", b'{"url": "http://a2"}')
            again, _ = await b.members("replica")
            assert again["r1"].data == b'{"url": "http://a2"}' and again["r1"].revision > members["r1"].revision
            await lease.delete("node", "n1")
            assert (await b.members("node"))[0] == {}
            await lease.put("node", "n2", b"{}")
        # leaving the lease revokes it: its records are gone at once
        assert (await b.members("replica"))[0] == {} and (await b.members("node"))[0] == {}


@pytest.mark.slow
async def test_records_expire_within_the_ttl_when_renewals_stop_and_come_back(cluster, clock):
    async with replicas(cluster, 2) as (a, b), a.lease(TTL) as lease:
        await lease.put("node", "n1", b"x")
        cluster.partition(a)
        cut_at = trio.current_time()
        await until(lambda: _has(b, "node", "n1", False))
        assert trio.current_time() - cut_at <= TTL + cluster.slack + 0.2
        await until(lambda: not lease.alive)
        with pytest.raises(Unavailable):
            await lease.put("node", "n2", b"y")  # written later, when the registry is back
        cluster.partition(a, False)

        # the holder notices its lease expired, gets a new one and writes its records again
        async def both_again() -> bool:  # put again one by one: wait for the second, whichever it is
            return set((await b.members("node"))[0]) == {"n1", "n2"}

        await until(both_again)
        members, _ = await b.members("node")
        assert members["n1"].lease == lease.id and lease.alive


async def _has(reg, kind, id, present):
    return (id in (await reg.members(kind))[0]) == present


# ---------------------------------------------------------------------- views


async def test_a_view_follows_changes(cluster, clock):
    async with replicas(cluster, 2) as (a, b), b.follow("node") as view:
        assert view.members == {} and view.version >= 1
        async with a.lease(TTL) as lease:
            v = view.version
            await lease.put("node", "n1", b"1")
            await lease.put("node", "n2", b"2")
            await lease.delete("node", "n1")
            with trio.fail_after(BOUND):
                while set(view.members) != {"n2"}:
                    await view.changed(v)
                    v = view.version
            assert view.members["n2"].data == b"2"
        with trio.fail_after(BOUND):
            while view.members:
                await view.changed(view.version)


async def test_a_view_resumes_from_its_revision(cluster, clock, monkeypatch):
    async with replicas(cluster, 2) as (a, b), a.lease(TTL) as lease:
        await lease.put("node", "n1", b"1")
        members, rev = await b.members("node")
        view = KVMemberView()
        view._set(members, rev)
        await lease.put("node", "n2", b"2")  # changes the view has not seen yet
        await lease.delete("node", "n1")
        listings: list[str] = []
        real = b.members

        def counting(kind):
            listings.append(kind)
            return real(kind)

        monkeypatch.setattr(b, "members", counting)
        async with trio.open_nursery() as n:
            await n.start(lambda task_status: b._keep_view("node", view, relist=False, task_status=task_status))
            with trio.fail_after(BOUND):
                while set(view.members) != {"n2"}:
                    await view.changed(view.version)
            n.cancel_scope.cancel()
        assert listings == []  # replayed from the revision, not listed again


async def test_a_view_lists_again_after_a_compaction(cluster, clock, monkeypatch):
    async with replicas(cluster, 2) as (a, b), a.lease(TTL) as lease:
        await lease.put("node", "ghost", b"1")
        members, rev = await b.members("node")
        view = KVMemberView()
        view._set(members, rev)
        await lease.delete("node", "ghost")
        for i in range(5):
            await lease.put("node", f"n{i}", b"x")
        _, now = await b.members("node")
        await cluster.compact(b, now)  # the view's next revision is gone
        listings: list[str] = []
        real = b.members

        def counting(kind):
            listings.append(kind)
            return real(kind)

        monkeypatch.setattr(b, "members", counting)
        async with trio.open_nursery() as n:
            await n.start(lambda task_status: b._keep_view("node", view, relist=False, task_status=task_status))
            with trio.fail_after(BOUND):
                while set(view.members) != {f"n{i}" for i in range(5)}:
                    await view.changed(view.version)
            # and it keeps following from the new revision
            await lease.put("node", "n9", b"x")
            with trio.fail_after(BOUND):
                while "n9" not in view.members:
                    await view.changed(view.version)
            n.cancel_scope.cancel()
        assert listings == ["node"]  # listed once, after the compaction; then watched


# ---------------------------------------------------------------------- election


async def test_exactly_one_leader_and_epochs_increase(cluster, clock):
    inside = 0
    terms: list[tuple[str, int]] = []
    done = trio.Event()

    async def candidate(reg, me):
        nonlocal inside
        while not done.is_set():
            async with reg.elect("scheduler", me, ttl=TTL) as term:
                inside += 1
                assert inside == 1, "two leaders at once"
                terms.append((me, term.epoch))
                leader = await reg.leader("scheduler")
                assert leader is not None and leader.candidate == me and leader.epoch == term.epoch
                await trio.sleep(0.1)
                inside -= 1
                if len(terms) >= 8:
                    done.set()
            # leaving the body resigned: someone else (or we again) leads next

    async with replicas(cluster, 4) as regs:
        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                for i, reg in enumerate(regs):
                    n.start_soon(candidate, reg, f"r{i}")
                await done.wait()
                n.cancel_scope.cancel()
        assert await regs[0].leader("scheduler") is None  # the last one resigned on cancellation
    epochs = [e for _, e in terms]
    assert epochs == sorted(set(epochs)) and len(epochs) >= 8


@pytest.mark.slow
async def test_a_leader_that_stops_renewing_steps_down_before_another_leads(cluster, clock):
    events: dict[str, float] = {}
    epochs: dict[str, int] = {}
    async with replicas(cluster, 2) as (a, b):

        async def lead(reg, me, ready):
            async with reg.elect("scheduler", me, ttl=TTL) as term:
                epochs[me] = term.epoch
                events[f"{me} elected"] = trio.current_time()
                ready.set()
                await trio.sleep_forever()  # cancelled when the lead is lost
            assert term.lost.is_set()
            events[f"{me} lost"] = trio.current_time()

        async with trio.open_nursery() as n:
            a_ready, b_ready = trio.Event(), trio.Event()
            n.start_soon(lead, a, "a", a_ready)
            await a_ready.wait()
            n.start_soon(lead, b, "b", b_ready)
            await trio.sleep(TTL)  # a renews meanwhile: b keeps waiting
            assert not b_ready.is_set()
            cluster.partition(a)
            cut = trio.current_time()
            with trio.fail_after(BOUND):
                await b_ready.wait()
            n.cancel_scope.cancel()

    # a stepped down on its own (it cannot know b is elected), before b was elected
    assert events["a lost"] <= events["b elected"]
    assert events["a lost"] - cut <= TTL - step_down_margin(TTL) + 0.1
    assert events["b elected"] - cut <= TTL + cluster.slack + 0.5
    assert epochs["b"] > epochs["a"]


@pytest.mark.slow
async def test_resigning_hands_the_lead_over_at_once(cluster, clock):
    async with replicas(cluster, 2) as (a, b):
        got = trio.Event()
        when: dict[str, float] = {}

        async def follower():
            async with b.elect("scheduler", "b", ttl=TTL) as term:
                when["b"] = trio.current_time()
                assert term.epoch > 0
                got.set()

        async with trio.open_nursery() as n:
            async with a.elect("scheduler", "a", ttl=TTL):
                n.start_soon(follower)
                await trio.sleep(TTL * 2)  # far beyond the TTL: a's renewals hold the lead
                assert not got.is_set()
                when["a"] = trio.current_time()
            with trio.fail_after(BOUND):
                await got.wait()
        assert when["b"] - when["a"] < TTL - step_down_margin(TTL)  # not waiting for the lease to expire


async def test_leader_is_none_without_one(cluster, clock):
    async with replicas(cluster, 1) as (a,):
        assert await a.leader("scheduler") is None
        async with a.elect("scheduler", "a", ttl=TTL) as term:
            leader = await a.leader("scheduler")
            assert leader is not None and (leader.candidate, leader.epoch) == ("a", term.epoch)
            assert await a.leader("other") is None
        assert await a.leader("scheduler") is None


async def test_a_partitioned_registry_is_unavailable_not_a_hang(cluster, clock):
    async with replicas(cluster, 1) as (a,):
        cluster.partition(a)
        for call in (lambda: a.members("node"), lambda: a.leader("scheduler")):
            with trio.fail_after(BOUND), pytest.raises(Unavailable):
                await call()
        with trio.fail_after(BOUND), pytest.raises(Unavailable):
            async with a.lease(TTL):
                pass
