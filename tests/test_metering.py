"""Metering through the real Claude Code CLI: the ledger is exact, budgets stop tasks, and the
real API key is nowhere the sandbox can read."""

from __future__ import annotations

import os

import pytest
import trio

from marathon.node.procs import alive, descendants
from marathon.pricing import cost, merged_table, price_for
from marathon.protocol.messages import Usage
from tests import fake_anthropic as fa
from tests.harness import TEST_KEY, make_git_repo, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow
MODEL = "claude-sonnet-4-5"


async def test_three_turn_ledger_equals_upstream_and_claude_and_is_priced():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    script = [
        fa.tool_use(
            "Write",
            {"file_path": "a.txt", "content": "a\n"},
            usage={"input_tokens": 1200, "output_tokens": 80, "cache_creation_input_tokens": 3000},
            start_usage={"input_tokens": 1300},
        ),
        fa.tool_use(
            "Bash",
            {"command": "cat a.txt"},
            usage={"input_tokens": 40, "output_tokens": 60, "cache_read_input_tokens": 3000},
        ),
        fa.text("done", usage={"input_tokens": 25, "output_tokens": 12, "cache_read_input_tokens": 3100}),
    ]
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url, model=MODEL)
        async with run_marathon(config) as mt:
            task = await mt.submit("three turns", repo=repo)
            final = await mt.finish(task["id"])
            assert final["state"] == "succeeded", final
            rows = await mt.info.tasks.store.ledger_rows(task["id"])
            assert len(rows) == len(fake.main_requests) == 3
            for row, req in zip(rows, fake.main_requests, strict=True):
                assert (
                    row.input_tokens,
                    row.output_tokens,
                    row.cache_creation_input_tokens,
                    row.cache_read_input_tokens,
                ) == tuple(req.usage.values())
                assert row.model == MODEL and row.status == 200 and row.complete and row.priced
            assert [r.tool_calls for r in rows] == [1, 1, 0]
            total = sum(
                (
                    Usage(r.input_tokens, r.output_tokens, r.cache_creation_input_tokens, r.cache_read_input_tokens)
                    for r in rows
                ),
                Usage(),
            )
            # ledger == what the upstream sent == what Claude Code itself reported == the task's usage
            assert total == Usage(**fake.usage_sent)
            assert fa.tokens(final["claude_usage"]) == fake.usage_sent
            assert fa.tokens(final["usage"]) == fake.usage_sent
            # cost == the price table applied to it (sonnet: 3 / 15 / 3.75 / 0.30 per million)
            price, known = price_for(MODEL, merged_table({}), config.price_fallback)
            assert known and (price.input, price.output, price.cw, price.cr) == pytest.approx((3.0, 15.0, 3.75, 0.3))
            expected = cost(total, price)
            assert abs(sum(r.cost_usd for r in rows) - expected) < 1e-12
            assert abs(final["cost_usd"] - expected) < 1e-12
            # /v1/usage agrees, broken down any way
            for by in ("total", "task", "model", "day"):
                u = (await mt.client.get("/v1/usage", params={"by": by, "since": "1d"})).json()
                assert u["total"]["input_tokens"] == total.input_tokens
                assert u["total"]["cache_read_input_tokens"] == total.cache_read_input_tokens
                assert abs(u["total"]["cost_usd"] - expected) < 1e-12
                assert u["total"]["requests"] == 3
            by_task = (await mt.client.get("/v1/usage", params={"by": "task"})).json()["rows"]
            assert by_task[0]["key"] == task["id"] and by_task[0]["compute_s"] > 0
            # every request is also an event in the task's stream, priced
            evs = [e["data"] for e in await mt.events(task["id"], follow=False) if e["event"] == "api_request"]
            assert len(evs) == 3 and abs(sum(e["cost_usd"] for e in evs) - expected) < 1e-12


async def test_server_tool_use_reaches_the_ledger_priced_per_request():
    """An answer in which the API ran 3 web searches itself: the proxy meters them, the ledger
    keeps them, the configured per-request price (here $25 per 1,000) is in the cost."""
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    script = [
        fa.web_search("trio nurseries", "Found it.", searches=3, usage={"input_tokens": 500, "output_tokens": 40})
    ]
    prices = {"*sonnet*": {"input": 3.0, "output": 15.0, "web_search": 25.0}}
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url, model=MODEL, prices=prices)
        async with run_marathon(config) as mt:
            task = await mt.submit("search the web", repo=repo)
            final = await mt.finish(task["id"])
            assert final["state"] == "succeeded", final
            assert fake.server_tools_sent["web_search_requests"] == 3
            (row,) = await mt.info.tasks.store.ledger_rows(task["id"])
            expected = 500 * 3.0 / 1e6 + 40 * 15.0 / 1e6 + 3 * 25.0 / 1000
            assert row.web_search_requests == 3 and row.web_fetch_requests == 0
            assert row.cost_usd == pytest.approx(expected) and row.priced
            assert final["usage"]["web_search_requests"] == 3 and final["cost_usd"] == pytest.approx(expected)
            u = (await mt.client.get("/v1/usage", params={"since": "1d"})).json()["total"]
            assert u["web_search_requests"] == 3 and u["cost_usd"] == pytest.approx(expected)


async def test_token_budget_stops_the_task_without_waiting_for_its_command():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    # turn 1 spends 1500 tokens and starts a long command; the budget is 1000
    script = [
        fa.tool_use(
            "Bash", {"command": "sleep 120", "timeout": 300000}, usage={"input_tokens": 1400, "output_tokens": 100}
        ),
        fa.text("never reached"),
    ]
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit("spend", repo=repo, max_tokens=1000)
            with trio.fail_after(60):
                await fake.wait_until(lambda f: bool(f.requests) and f.requests[0].completed)
            procs = descendants(os.getpid())
            final = await mt.finish(task["id"], timeout=30)
            assert final["state"] == "failed" and final["reason"] == "budget_exhausted", final
            assert "1500 of 1000 tokens" in final["message"]
            # stopped as the response crossed the budget, not when the 120 s command ended (mt.finish's
            # bound is 30 s), and not by the task's timeout
            assert "timed out" not in final["message"]
            assert fa.tokens(final["usage"]) == fake.usage_sent  # usage so far is kept
            assert len(fake.requests) == 1
            assert alive(procs) == set(), "Claude Code (or its sleep) survived the budget stop"


async def test_real_key_is_absent_from_everything_the_sandbox_can_read():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    waiting = trio.Event()

    def script(body, i):
        if i == 0:
            return fa.tool_use(
                "Bash", {"command": "env > env.txt; cat ~/.claude.json > cfg.txt 2>&1; ls -la ~ > home.txt"}
            )
        waiting.set()
        return fa.hang()

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit("look around", repo=repo)
            with trio.fail_after(60):
                await waiting.wait()
            # usage is live: the first request is metered and priced while the task still runs
            with trio.fail_after(10):  # the ledger row travels node -> orchestrator on its own
                # noqa: ASYNC110 below: the usage lands after its event, in another transaction, unannounced
                while not (live := await mt.task(task["id"]))["usage"]["input_tokens"]:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert live["state"] == "running"
            assert live["usage"]["input_tokens"] == fake.requests[0].usage["input_tokens"] > 0 and live["cost_usd"] > 0
            key = TEST_KEY.encode()
            procs = sorted(descendants(os.getpid()))
            assert len(procs) >= 3
            scanned_files = 0
            roots = set()
            for pid in procs:
                for what in ("environ", "cmdline"):
                    try:
                        with open(f"/proc/{pid}/{what}", "rb") as f:
                            assert key not in f.read(), f"key in /proc/{pid}/{what}"
                    except (FileNotFoundError, ProcessLookupError):
                        pass
                try:
                    roots.add(os.readlink(f"/proc/{pid}/root"))
                except OSError:
                    pass
            # the sandbox's own view of its files: workspace and every home/tmp in it
            sandbox_pids = [p for p in procs if _in_other_mount_ns(p)]
            assert sandbox_pids
            root = f"/proc/{sandbox_pids[-1]}/root"
            for top in ("workspace", "tmp", "home", "run"):
                for dirpath, _, files in os.walk(os.path.join(root, top)):
                    for name in files:
                        path = os.path.join(dirpath, name)
                        try:
                            with open(path, "rb") as f:
                                data = f.read()
                        except OSError:
                            continue
                        scanned_files += 1
                        assert key not in data, f"key found in {path}"
            assert scanned_files >= 4  # env.txt, cfg.txt, home.txt, Claude Code's own files
            with open(os.path.join(root, "workspace", "env.txt")) as env_file:
                env_txt = env_file.read()
            assert "ANTHROPIC_API_KEY=mt_" in env_txt  # what Claude Code holds is the per-task token
            assert fake.requests[0].headers["x-api-key"] == TEST_KEY  # and the upstream still got the key
            await mt.client.post(f"/v1/tasks/{task['id']}/cancel")
            await mt.finish(task["id"])


def _in_other_mount_ns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    except OSError:
        return False
