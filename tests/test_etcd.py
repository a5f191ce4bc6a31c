"""etcd specifics: both gateway prefixes, several endpoints, and a restart of the server."""

import secrets

import httpx
import pytest
import trio

from marathon.registry.etcd import EtcdKV, open_etcd_registry
from tests.polling import until


async def _led_by(reg, who):
    leader = await reg.leader("scheduler")
    return leader is not None and leader.candidate == who


class OnlyPrefix(httpx.AsyncBaseTransport):
    """An etcd that routes one gateway prefix only (3.5+: /v3; 3.3: /v3beta)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.seen.append(path)
        if not path.startswith(self.prefix + "/"):
            return httpx.Response(404, text="404 page not found\n", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_etcd_34_serves_both_gateway_prefixes(etcd_server):
    async with httpx.AsyncClient() as c:
        for prefix in ("/v3", "/v3beta"):
            r = await c.post(f"{etcd_server.endpoint}{prefix}/kv/range", json={"key": "eA=="})
            assert r.status_code == 200 and "header" in r.json(), prefix
        version = (await c.get(f"{etcd_server.endpoint}/version")).json()
        assert version["etcdserver"].startswith("3.")


async def _exercise(reg):
    async with reg.lease(3) as lease, reg.follow("node") as view:
        await lease.put("node", "n1", b"x")
        with trio.fail_after(20):
            while "n1" not in view.members:
                await view.changed(view.version)
        async with reg.elect("scheduler", "me", ttl=3) as term:
            leader = await reg.leader("scheduler")
            assert leader is not None and leader.epoch == term.epoch


async def test_the_client_uses_whichever_prefix_the_server_routes(etcd_server):
    for prefix in ("/v3", "/v3beta"):
        t = OnlyPrefix(prefix)
        async with open_etcd_registry(
            [etcd_server.endpoint], prefix=f"/t-{secrets.token_hex(4)}/", timeout=2, transport=t
        ) as reg:
            await _exercise(reg)
        assert any(p.startswith(prefix + "/watch") for p in t.seen)
        served = [p for p in t.seen if p.startswith(prefix + "/")]
        assert len(served) >= len(t.seen) - 1  # at most one probe of the other prefix


async def test_an_unreachable_endpoint_is_skipped(etcd_server):
    from tests.servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    async with open_etcd_registry([dead, etcd_server.endpoint], prefix=f"/t-{secrets.token_hex(4)}/", timeout=2) as reg:
        await _exercise(reg)
        assert reg.kv.endpoints[reg.kv._current] == etcd_server.endpoint  # type: ignore[attr-defined]


async def test_int64_lease_ids_and_revisions_round_trip(etcd_server):
    kv = EtcdKV([etcd_server.endpoint], timeout=2)
    try:
        lease = await kv.grant(5)
        assert lease > 2**32  # etcd's ids are 64-bit: JSON strings, never floats
        rev = await kv.put("/t/x", b"\x00\xff", lease)
        got = await kv.get("/t/x")
        assert got is not None and got.value == b"\x00\xff" and got.lease == lease and got.mod_revision == rev
        assert await kv.keepalive(lease) == 5
        await kv.revoke(lease)
        assert await kv.keepalive(lease) == 0 and await kv.get("/t/x") is None
        await kv.revoke(lease)  # twice: not an error
    finally:
        await kv.aclose()


@pytest.mark.slow
async def test_membership_and_leadership_come_back_after_an_etcd_restart(own_servers):
    etcd = own_servers.etcd()
    prefix = f"/t-{secrets.token_hex(4)}/"
    async with (
        open_etcd_registry([etcd.endpoint], prefix=prefix, timeout=2) as a,
        open_etcd_registry([etcd.endpoint], prefix=prefix, timeout=2) as b,
        a.lease(5) as lease,
        b.follow("node") as view,
    ):
        await lease.put("node", "n1", b"x")
        terms: list[int] = []

        async def lead():
            while True:
                async with a.elect("scheduler", "a", ttl=5) as term:
                    terms.append(term.epoch)
                    await trio.sleep_forever()

        async with trio.open_nursery() as n:
            n.start_soon(lead)
            await until(lambda: bool(terms) and "n1" in view.members)
            await trio.to_thread.run_sync(etcd.stop)
            await trio.to_thread.run_sync(etcd.start)
            await lease.put("node", "n2", b"y")  # works again without help
            with trio.fail_after(30):
                while {"n1", "n2"} - set(view.members) or not lease.alive:
                    await view.changed(view.version)
            await until(lambda: _led_by(b, "a"))
            leader = await b.leader("scheduler")
            assert leader is not None and leader.epoch == terms[-1]
            n.cancel_scope.cancel()
