"""Metering-proxy overhead: the same SSE responses fetched directly from the fake upstream,
through the proxy without a budget, and through the proxy with a budget (reserve before
forwarding, settle after: marathon/node/budget.py), interleaved in one run.

Reports added latency to the first byte (p50/p99), the time-to-first-byte ratio with the
reservation logic vs without, and the throughput ratio for a large stream.

    .venv/bin/python -m bench.proxy [N]
"""

from __future__ import annotations

import sys
import time

import httpx
import trio

from bench.common import describe, pct
from marathon.node.budget import Budget
from marathon.node.proxy import MeteringProxy, ProxyGrant
from marathon.pricing import merged_table
from tests import fake_anthropic as fa

KEY, TOKEN = "sk-bench-key", "mt_bench"
BODY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1000,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
    "tools": [{"name": "Bash", "input_schema": {}}],
}


async def ttfb(client: httpx.AsyncClient, url: str, key: str) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = None
    n = 0
    async with client.stream("POST", url, json=BODY, headers={"x-api-key": key}) as r:
        async for chunk in r.aiter_raw():
            if first is None:
                first = time.perf_counter() - t0
            n += len(chunk)
    assert first is not None, "no response body"
    return first, time.perf_counter() - t0, n


async def main(n: int) -> None:
    big = "x" * 200  # a large answer: many text deltas
    small = [fa.text("hello")]
    async with trio.open_nursery() as nursery:
        fake_small = await nursery.start(
            lambda task_status: fa.serve_fake_anthropic(lambda b, i: small[0], api_key=KEY, task_status=task_status)
        )
        fake_big = await nursery.start(
            lambda task_status: fa.serve_fake_anthropic(
                lambda b, i: fa.text(big * 5000), api_key=KEY, task_status=task_status
            )
        )
        grant = ProxyGrant(task_id="bench", token=TOKEN, on_record=lambda r: None)
        # a budget that never runs out, with a dollar limit too: every request reserves and settles
        budget = Budget(max_tokens=10**15, max_cost=1e12, prices=merged_table({}))
        budgeted = ProxyGrant(task_id="bench", token=TOKEN, on_record=lambda r: None, budget=budget)
        ports = {}
        for name, fake, g in (
            ("small", fake_small, grant),
            ("small+budget", fake_small, budgeted),
            ("big", fake_big, grant),
        ):
            proxy = MeteringProxy(fake.url, KEY)
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            await nursery.start(trio.serve_listeners, lambda s, p=proxy, g=g: p.handle(s, g), listeners)
            ports[name] = listeners[0].socket.getsockname()[1]
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            direct, proxied, reserved = [], [], []
            for _ in range(5):
                await ttfb(client, fake_small.url + "/v1/messages", KEY)
                await ttfb(client, f"http://127.0.0.1:{ports['small']}/v1/messages", TOKEN)
                await ttfb(client, f"http://127.0.0.1:{ports['small+budget']}/v1/messages", TOKEN)
            for _ in range(n):
                direct.append((await ttfb(client, fake_small.url + "/v1/messages", KEY))[0])
                proxied.append((await ttfb(client, f"http://127.0.0.1:{ports['small']}/v1/messages", TOKEN))[0])
                reserved.append((await ttfb(client, f"http://127.0.0.1:{ports['small+budget']}/v1/messages", TOKEN))[0])
            bd, bp = [], []
            for _ in range(5):
                _, t, size = await ttfb(client, fake_big.url + "/v1/messages", KEY)
                bd.append(size / t)
                _, t, size = await ttfb(client, f"http://127.0.0.1:{ports['big']}/v1/messages", TOKEN)
                bp.append(size / t)
        nursery.cancel_scope.cancel()
    print(f"metering proxy overhead ({n} small streamed responses each, interleaved)")
    print(describe("direct from upstream: time to first byte", direct))
    print(describe("through the proxy: time to first byte", proxied))
    print(describe("proxy + budget reservation: TTFB", reserved))
    assert budget.in_flight == 0 and budget.usage.total > 0
    print(
        f"added latency to first byte: p50 {(pct(proxied, 50) - pct(direct, 50)) * 1000:.2f} ms, "
        f"p99 {(pct(proxied, 99) - pct(direct, 99)) * 1000:.2f} ms"
    )
    print(
        f"time to first byte with the reservation logic vs without: p50 ratio {pct(reserved, 50) / pct(proxied, 50):.3f}, "
        f"p99 ratio {pct(reserved, 99) / pct(proxied, 99):.3f}"
    )
    print(
        f"large stream ({size / 1e6:.1f} MB of SSE): direct {pct(bd, 50) / 1e6:.1f} MB/s, proxied {pct(bp, 50) / 1e6:.1f} MB/s, "
        f"ratio {pct(bp, 50) / pct(bd, 50):.2f}"
    )


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 200)
