"""End to end: the real Claude Code CLI in a bubblewrap sandbox, driven by our fake Messages API."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from tests import fake_anthropic as fa
from tests.harness import alive, descendants, make_git_repo, run_marathon, scratch_dir, marathon_config

pytestmark = pytest.mark.slow

CONTRIBUTING = "# Contributing\n\n1. Fork the repository.\n2. Make a branch.\n3. Open a pull request.\n"


def write_bash_done():
    return [
        fa.tool_use(
            "Write",
            {"file_path": "CONTRIBUTING.md", "content": CONTRIBUTING},
            usage={"input_tokens": 120, "output_tokens": 30, "cache_read_input_tokens": 7},
        ),
        fa.tool_use(
            "Bash",
            {"command": "git status --short", "description": "status"},
            usage={"input_tokens": 150, "output_tokens": 25, "cache_creation_input_tokens": 11},
        ),
        fa.text("I added CONTRIBUTING.md.", usage={"input_tokens": 170, "output_tokens": 12}),
    ]


async def test_cli_run_succeeds_with_real_claude_code():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    async with fa.open_fake_anthropic(write_bash_done()) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            res = await trio.run_process(
                [sys.executable, "-m", "marathon", "run", "add a CONTRIBUTING.md", "--repo", repo],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "MARATHON_URL": mt.url},
            )
            out = res.stdout.decode()
            assert res.returncode == 0, out + res.stderr.decode()
            task_id = out.split()[1]
            assert "→ Write CONTRIBUTING.md" in out
            assert "→ Bash git status --short" in out
            assert "succeeded" in out and "CONTRIBUTING.md | 5" in out

            task = await mt.task(task_id)
            assert task["state"] == "succeeded"
            assert task["num_turns"] == 3
            # the usage Marathon reports is what the upstream sent, exactly
            assert fa.tokens(task["usage"]) == fake.usage_sent
            assert fake.usage_sent["input_tokens"] == 440

            events = await mt.events(task_id, follow=False)
            calls = [e["data"]["name"] for e in events if e["event"] == "tool_call"]
            assert calls == ["Write", "Bash"]
            results = [e["data"]["summary"] for e in events if e["event"] == "tool_result"]
            assert any("CONTRIBUTING.md" in r for r in results)
            assert [e["id"] for e in events] == list(range(1, len(events) + 1))
            states = [e["data"]["state"] for e in events if e["event"] == "state"]
            assert states == ["queued", "scheduled", "starting", "running", "succeeded"]

            diff = (await mt.client.get(f"/v1/tasks/{task_id}/diff")).text
            assert "+++ b/CONTRIBUTING.md" in diff and "+1. Fork the repository." in diff

            # Claude Code presented the per-task token, never the real key
            keys = {r.headers.get("x-api-key") for r in fake.requests}
            assert keys == {config.anthropic_api_key}
            assert all(r.headers.get("x-api-key") != "" for r in fake.requests)
    # the source repository is untouched
    assert not os.path.exists(os.path.join(repo, "CONTRIBUTING.md"))


async def test_cancel_kills_agent_and_claude():
    tmp = scratch_dir()
    script, requested = fa.hanging_script()

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit("wait forever")
            with trio.fail_after(60):
                await requested.wait()
            procs = descendants(os.getpid())
            assert len(procs) >= 3  # bwrap, agent, claude (and maybe helpers)
            r = await mt.client.post(f"/v1/tasks/{task['id']}/cancel")
            assert r.status_code == 202
            final = await mt.finish(task["id"], timeout=30)
            assert final["state"] == "cancelled"
            assert alive(procs) == set(), "processes left behind after cancel"
            assert not os.path.exists(os.path.join(config.data_dir, "sandboxes", task["id"]))


async def test_hanging_api_times_out():
    tmp = scratch_dir()
    async with fa.open_fake_anthropic(lambda body, i: fa.hang()) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit("hang", timeout=4)
            final = await mt.finish(task["id"], timeout=40)
            assert final["state"] == "timed_out"
            assert final["reason"] == "timeout"
            assert alive(descendants(os.getpid())) == set()
