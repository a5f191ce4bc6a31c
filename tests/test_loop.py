"""The iterative loop with the real Claude Code CLI: promise, verify, MEMORY.md, clarification."""

from __future__ import annotations

import os

import pytest

from tests import fake_anthropic as fa
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow


def prompt_of(body: dict) -> str:
    """The text of the conversation's first user message (the prompt Claude Code was run with)."""
    content = body["messages"][0]["content"]
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content if isinstance(b, dict))


def conversations(fake) -> list[str]:
    """Prompts of the runs, in order (one per iteration)."""
    seen: list[str] = []
    for r in fake.main_requests:
        p = prompt_of(r.body)
        if r.turn == 0 and p not in seen:
            seen.append(p)
    return seen


async def test_two_iterations_with_context_prefix_and_memory():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))

    def script(body, i):
        if "[Marathon: iteration 2 of 3]" in prompt_of(body):
            return [
                fa.tool_use("Write", {"file_path": "step2.txt", "content": "two\n"}),
                fa.text("Both steps are done.\n<promise>ALL DONE</promise>"),
            ][i]
        return [
            fa.tool_use("Write", {"file_path": "MEMORY.md", "content": "remember: step one finished, step two next\n"}),
            fa.tool_use("Write", {"file_path": "step1.txt", "content": "one\n"}),
            fa.text("Step one is finished; step two remains."),
        ][i]

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit("do two steps", repo=repo, max_iterations=3, promise="ALL DONE")
            final = await mt.finish(task["id"])
            assert final["state"] == "succeeded", final
            assert final["iterations"] == 2
            first, second = conversations(fake)
            assert "do two steps" in first and "<promise>ALL DONE</promise>" in first
            # Claude Code puts its own <system-reminder> blocks before the prompt
            assert second.split("</system-reminder>")[-1].strip().startswith("[Marathon: iteration 2 of 3]")
            assert "<task>\ndo two steps\n</task>" in second
            assert "remember: step one finished, step two next" in second  # MEMORY.md from iteration 1
            assert "Step one is finished; step two remains." in second  # the previous final message
            # a commit per iteration, MEMORY.md kept out of the work
            assert final["commits"] == 2
            diff = (await mt.client.get(f"/v1/tasks/{task['id']}/diff")).text
            assert "step1.txt" in diff and "step2.txt" in diff and "MEMORY.md" not in diff
            events = await mt.events(task["id"], follow=False)
            assert [e["data"]["iteration"] for e in events if e["event"] == "iteration"] == [1, 2]
            calls = [(e["data"]["iteration"], e["data"]["summary"]) for e in events if e["event"] == "tool_call"]
            assert calls == [(1, "Write MEMORY.md"), (1, "Write step1.txt"), (2, "Write step2.txt")]
            api = [e["data"]["iteration"] for e in events if e["event"] == "api_request"]
            assert api == [1, 1, 1, 2, 2]


async def test_verify_iterates_until_the_check_passes():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))

    def script(body, i):
        p = prompt_of(body)
        if "iteration 2 of" in p:
            assert "test -f done.txt" in p and "exit 1" in p  # the failed check feeds the next iteration
            return [
                fa.tool_use("Write", {"file_path": "done.txt", "content": "yes\n"}),
                fa.text("<promise>DONE</promise>"),
            ][i]
        return fa.text("Finished!\n<promise>DONE</promise>")  # a false claim

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit(
                "make done.txt", repo=repo, max_iterations=4, promise="DONE", verify="test -f done.txt"
            )
            final = await mt.finish(task["id"])
            assert final["state"] == "succeeded" and final["iterations"] == 2, final
            logs = [e["data"]["message"] for e in await mt.events(task["id"], follow=False) if e["event"] == "log"]
            assert any("check `test -f done.txt` exited 1" in x for x in logs)
            assert any("check `test -f done.txt` exited 0" in x for x in logs)


async def test_verify_never_passing_fails_with_max_iterations():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    async with fa.open_fake_anthropic(lambda body, i: fa.text("<promise>DONE</promise>")) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit("never", repo=repo, max_iterations=2, promise="DONE", verify="test -f done.txt")
            final = await mt.finish(task["id"])
            assert final["state"] == "failed" and final["reason"] == "max_iterations", final
            assert final["iterations"] == 2 and "never passed" in final["message"]
            assert len(conversations(fake)) == 2


async def test_promise_in_a_tool_result_or_echoed_does_not_complete():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    script = [
        fa.tool_use("Bash", {"command": "echo '<promise>DONE</promise>'"}),
        fa.turn(
            "<promise>DONE</promise> (an earlier message, followed by more work)",
            fa.tool_use("Bash", {"command": "true"}),
        ),
        fa.text("Not finished yet: the promise comes when it is true."),
    ]
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit("tricky", repo=repo, max_iterations=1, promise="DONE")
            final = await mt.finish(task["id"])
            assert final["state"] == "failed" and final["reason"] == "max_iterations", final
            results = [
                e["data"]["summary"] for e in await mt.events(task["id"], follow=False) if e["event"] == "tool_result"
            ]
            assert any("<promise>DONE</promise>" in r for r in results)


async def test_clarification_needs_input_then_reply_continues_the_work():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))

    def script(body, i):
        p = prompt_of(body)
        if "<answer>\nblue\n</answer>" in p:
            return [
                fa.tool_use("Bash", {"command": "cat notes.txt"}),
                fa.tool_use("Write", {"file_path": "color.txt", "content": "blue\n"}),
                fa.text("Painted it blue."),
            ][i]
        return [
            fa.tool_use("Write", {"file_path": "notes.txt", "content": "partial work\n"}),
            fa.tool_use("Write", {"file_path": "MEMORY.md", "content": "asked about the color\n"}),
            fa.text("I need to know one thing.\n<clarification>Which color should it be?</clarification>"),
        ][i]

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit("paint it", repo=repo)
            await mt.wait_state(task["id"], {"needs_input"})
            t = await mt.task(task["id"])
            assert t["state"] == "needs_input" and t["question"] == "Which color should it be?"
            assert t["commits"] == 1
            r = await mt.client.post(f"/v1/tasks/{task['id']}/reply", json={"answer": "blue"})
            assert r.status_code == 202
            r = await mt.client.post(f"/v1/tasks/{task['id']}/reply", json={"answer": "again"})
            assert r.status_code == 409
            final = await mt.finish(task["id"])
            assert final["state"] == "succeeded", final
            assert final["iterations"] == 2 and final["commits"] == 2
            second = conversations(fake)[1]
            assert "[Marathon: iteration 2 of 2]" in second and "asked about the color" in second
            events = await mt.events(task["id"], follow=False)
            results = [
                e["data"]["summary"] for e in events if e["event"] == "tool_result" and e["data"]["iteration"] == 2
            ]
            assert "partial work" in results[0]  # the same work, continued
            diff = (await mt.client.get(f"/v1/tasks/{task['id']}/diff")).text
            assert "notes.txt" in diff and "color.txt" in diff
            states = [e["data"]["state"] for e in events if e["event"] == "state"]
            assert states == [
                "queued",
                "scheduled",
                "starting",
                "running",
                "needs_input",
                "queued",
                "scheduled",
                "starting",
                "running",
                "succeeded",
            ]
