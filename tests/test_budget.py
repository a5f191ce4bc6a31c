"""Budgets under concurrency: reserve before forwarding, settle after, and the stated bound
(marathon/node/budget.py) checked on 20 parallel requests through the real proxy."""

from __future__ import annotations

import re

import httpx
import pytest
import trio

from marathon.node.budget import DEFAULT_RESERVE, Budget, Reservation
from marathon.node.proxy import MeteringProxy, ProxyGrant, RequestRecord
from marathon.pricing import merged_table
from marathon.protocol.messages import Price, Usage
from tests import fake_anthropic as fa
from tests.polling import until

REAL_KEY = "sk-ant-real-" + "b" * 20
TOKEN = "mt_budget_token"
SONNET = "claude-sonnet-4-5"  # $3 / $15 per million in the shipped table


# ---------------------------------------------------------------- the pure rule


def test_reservations_block_new_requests_but_only_usage_stops_the_task():
    b = Budget(max_tokens=1000)
    r1 = b.reserve(SONNET, 600)
    r2 = b.reserve(SONNET, 600)
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    assert (r1.tokens, r2.tokens) == (600, 400)  # at most max_tokens, clipped to what is left
    refused = b.reserve(SONNET, 10)
    assert refused == "token budget exhausted: 0 of 1000 tokens used, 1000 more held by 2 requests still in flight"
    assert b.exhausted() is None  # reserved, not used: the task goes on
    b.settle(r1, Usage(100, 50), SONNET)
    b.settle(r1, Usage(100, 50), SONNET)  # settling twice counts once
    assert b.usage.total == 150 and b.in_flight == 1
    r3 = b.reserve(SONNET, 5000)
    assert isinstance(r3, Reservation) and r3.tokens == 1000 - 150 - 400
    b.settle(r2, Usage(900, 400), SONNET)  # used more than it reserved (its input was never reserved)
    b.settle(r3, Usage(10, 10), SONNET)
    assert b.exhausted() == "token budget exhausted: 1470 of 1000 tokens used"
    assert b.reserve(SONNET, 1) == "token budget exhausted: 1470 of 1000 tokens used"


def test_what_a_request_in_flight_has_already_used_counts_when_larger_than_its_reservation():
    b = Budget(max_tokens=500)
    r1 = b.reserve(SONNET, 100)
    assert isinstance(r1, Reservation)
    seen = Usage(450, 1)  # message_start said: 450 input tokens
    r1.live = lambda: seen
    assert b.held()[0] == 451
    r2 = b.reserve(SONNET, 100)
    assert isinstance(r2, Reservation) and r2.tokens == 49


def test_missing_or_odd_max_tokens_reserve_the_default_and_count_tokens_reserves_nothing():
    b = Budget(max_tokens=10**9)
    for value in (None, "many", True, -5, 2.5):
        r = b.reserve(SONNET, value)
        assert isinstance(r, Reservation) and r.tokens == DEFAULT_RESERVE
    r = b.reserve(SONNET, 0)
    assert isinstance(r, Reservation) and r.tokens == 0


def test_dollar_budget_reserves_max_tokens_at_the_output_price():
    b = Budget(max_cost=0.02, prices=merged_table({}))
    r1 = b.reserve(SONNET, 1000)  # 1000 output tokens at $15 per million: $0.015
    r2 = b.reserve(SONNET, 1000)
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    assert r1.usd == pytest.approx(0.015) and r2.usd == pytest.approx(0.005)
    assert b.reserve(SONNET, 1) == (
        "cost budget exhausted: $0.0000 of $0.0200 spent, $0.0200 more held by 2 requests still in flight"
    )
    b.settle(r1, Usage(1000, 1000), SONNET)  # $0.003 + $0.015
    b.settle(r2, Usage(0, 0), SONNET)
    assert b.cost == pytest.approx(0.018) and b.exhausted() is None
    r3 = b.reserve("claude-unknown-model", 1000)  # unknown: the fallback's output price ($75 per million)
    assert isinstance(r3, Reservation) and r3.usd == pytest.approx(0.002)
    b.settle(r3, Usage(0, 100), "claude-unknown-model")
    assert b.exhausted() == "cost budget exhausted: $0.0255 of $0.0200 spent"


def test_server_tool_requests_are_priced_per_request_and_count_towards_a_dollar_budget():
    table = merged_table({"*sonnet*": Price(3.0, 15.0, web_search=20.0)})
    b = Budget(max_cost=0.05, prices=table)
    r = b.reserve(SONNET, 100)
    assert isinstance(r, Reservation)
    b.settle(r, Usage(0, 0, web_search_requests=3), SONNET)  # 3 searches at $20 per 1,000
    assert b.cost == pytest.approx(0.06) and b.exhausted() is not None


def test_unlimited_budget_only_counts():
    b = Budget()
    r = b.reserve(None, None)
    assert isinstance(r, Reservation) and (r.tokens, r.usd) == (0, 0.0)
    b.settle(r, Usage(5, 5), None)
    assert b.usage == Usage(5, 5) and b.exhausted() is None


# ---------------------------------------------------------------- through the real proxy


class Logged(Budget):
    """A Budget that writes down every admission (with who was in flight then) and settlement,
    so a test can check the stated bound against what actually happened."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.admissions: list[tuple[Reservation, list[Reservation]]] = []
        self.refusals: list[tuple[str, int, int]] = []  # (message, settled tokens, held tokens) at that moment
        self.used: dict[int, int] = {}  # id(reservation) -> tokens it really used

    def reserve(self, model, max_tokens):
        before = list(self._open)
        held = self.held()[0]
        got = super().reserve(model, max_tokens)
        if isinstance(got, str):
            self.refusals.append((got, self.usage.total, held))
        else:
            self.admissions.append((got, before))
        return got

    def settle(self, res, usage, model):
        if not res.settled:
            self.used[id(res)] = usage.total
        super().settle(res, usage, model)

    def bound(self) -> int:
        """B + sum over the requests in flight at the last admission (it included) of (a_j - r_j)."""
        last, others = self.admissions[-1]
        assert self.max_tokens is not None
        return self.max_tokens + sum(self.used[id(r)] - r.tokens for r in [*others, last])


async def serve_proxy(nursery, script, budget):
    fake = await nursery.start(
        lambda task_status: fa.serve_fake_anthropic(script, api_key=REAL_KEY, task_status=task_status)
    )
    proxy = MeteringProxy(fake.url, REAL_KEY)
    records: list[RequestRecord] = []
    grant = ProxyGrant(task_id="t1", token=TOKEN, on_record=records.append, budget=budget)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, lambda s: proxy.handle(s, grant), listeners)
    return fake, records, f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def request_body(max_tokens: int, stream: bool = True) -> dict:
    return {
        "model": SONNET,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
    }


async def fire(url: str, n: int, max_tokens: int) -> list[httpx.Response]:
    out: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client:

        async def one() -> None:
            out.append(await client.post("/v1/messages", json=request_body(max_tokens), headers={"x-api-key": TOKEN}))

        async with trio.open_nursery() as n_:
            for _ in range(n):
                n_.start_soon(one)
    return out


@pytest.mark.parametrize("max_tokens", [1000, 20])
async def test_twenty_parallel_requests_stay_within_the_stated_bound(max_tokens):
    """Each answer uses 120 tokens (100 in, 20 out) and streams slowly, so the 20 requests overlap.
    With max_tokens 1000 the first request reserves the whole budget of 150; with max_tokens 20
    up to 8 can be admitted at once (7 x 20, then the last 10), and the overrun is their
    unreserved input tokens -- still within the bound."""
    budget = Logged(max_tokens=150)
    async with trio.open_nursery() as n:
        fake, records, url = await serve_proxy(n, lambda b, i: fa.text("a slow answer", delay=0.05), budget)
        responses = await fire(url, 20, max_tokens)
        assert budget.in_flight == 0  # every reservation was released
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 402]
        assert len(ok) + len(refused) == 20 and len(ok) == len(fake.requests) == len(budget.admissions)
        metered = sum(r.usage.total for r in records)
        assert metered == budget.usage.total == fa.tokens(fake.usage_sent)["input_tokens"] + 20 * len(ok)
        assert metered <= budget.bound()  # the stated bound, computed from what happened
        if max_tokens == 1000:
            assert len(ok) == 1 and metered == 120 <= 150
        else:
            assert 1 <= len(ok) <= 8
        # every refusal said what was true at that moment
        assert len(budget.refusals) == len(refused)
        for resp in refused:
            err = resp.json()["error"]
            assert err["type"] == "budget_exhausted" and err["message"] in [m for m, _, _ in budget.refusals]
        for message, used, held in budget.refusals:
            got = re.match(r"token budget exhausted: (\d+) of 150 tokens used(?:, (\d+) more held by \d+ )?", message)
            assert got and int(got.group(1)) == used and int(got.group(2) or 0) == held
            assert used + held >= 150 and used <= metered
        # once they have all ended, a request reserves what is left (if anything) and no more
        late = await fire(url, 1, max_tokens)
        if metered < 150:
            assert late[0].status_code == 200
            metered = budget.usage.total
            assert metered <= budget.bound()
        assert (await fire(url, 1, max_tokens))[0].json()["error"]["message"] == (
            f"token budget exhausted: {metered} of 150 tokens used"
        )
        n.cancel_scope.cancel()


async def test_reservations_are_released_when_the_client_leaves_or_the_upstream_fails():
    budget = Budget(max_tokens=10_000)
    script = [
        fa.text("x" * 3000, usage={"input_tokens": 10, "output_tokens": 700}, delay=0.01),
        fa.drop_after(3, fa.text("cut", usage={"input_tokens": 50, "output_tokens": 40})),
    ]
    async with trio.open_nursery() as n:
        answered = iter(script)
        fake, records, url = await serve_proxy(n, lambda b, i: next(answered), budget)
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client:
            async with client.stream(
                "POST", "/v1/messages", json=request_body(5000), headers={"x-api-key": TOKEN}
            ) as r:
                async for _ in r.aiter_raw():
                    break  # hang up after the first bytes
            await until(lambda: len(records) >= 1, timeout=10, interval=0.01)
            assert budget.in_flight == 0 and budget.usage == Usage(10, 700)  # metered to the end
            with pytest.raises(httpx.HTTPError):
                await client.post("/v1/messages", json=request_body(5000), headers={"x-api-key": TOKEN})
            await until(lambda: len(records) >= 2, timeout=10, interval=0.01)
            assert budget.in_flight == 0 and budget.usage == Usage(60, 701)
        n.cancel_scope.cancel()
    # an upstream that cannot be reached: 502, nothing used, nothing held
    budget = Budget(max_tokens=100)
    proxy = MeteringProxy("http://127.0.0.1:9", REAL_KEY)
    grant = ProxyGrant(task_id="t1", token=TOKEN, on_record=lambda r: None, budget=budget)
    async with trio.open_nursery() as n:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await n.start(trio.serve_listeners, lambda s: proxy.handle(s, grant), listeners)
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client:
            r = await client.post("/v1/messages", json=request_body(5000), headers={"x-api-key": TOKEN})
        assert r.status_code == 502 and budget.in_flight == 0 and budget.usage == Usage()
        n.cancel_scope.cancel()


@pytest.mark.parametrize("stream", [True, False])
async def test_server_tool_use_is_metered_by_the_proxy(stream):
    budget = Budget(prices=merged_table({}))
    turn = fa.web_search("marathon", "Found it.", searches=3, usage={"input_tokens": 200, "output_tokens": 30})
    async with trio.open_nursery() as n:
        fake, records, url = await serve_proxy(n, [turn], budget)
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as client:
            r = await client.post("/v1/messages", json=request_body(1000, stream), headers={"x-api-key": TOKEN})
        assert r.status_code == 200
        assert records[0].usage == Usage(200, 30, web_search_requests=3)
        assert fake.server_tools_sent == {"web_search_requests": 3, "web_fetch_requests": 0}
        assert records[0].tool_calls == 1  # the server tool call is a tool call too
        # 200 x $3 + 30 x $15 per million, and 3 searches at $10 per 1,000
        assert budget.cost == pytest.approx(200 * 3e-6 + 30 * 15e-6 + 0.03)
        n.cancel_scope.cancel()
