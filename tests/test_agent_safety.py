"""The agent cannot be turned against its host, and runs where users install things:

- a ``MEMORY.md`` symlink committed by the task (to a device, to a host file) changes nothing
  outside the workspace when the task is resumed (the root agent writes the notes back);
- the plain fallback (no bubblewrap) works on a root node;
- ``claude`` found only on PATH, as a symlink to a versioned binary (the native installer's
  layout), works; a node without any Claude Code refuses to start with a clear error.
"""

from __future__ import annotations

import os
import stat

import pytest

from marathon.config import load_config
from marathon.errors import ConfigError
from marathon.node.sandbox.process import ProcessBackend, resolve_claude
from tests import fake_anthropic as fa
from tests.harness import claude_bin, make_git_repo, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow


def plant_memory_symlink(target: str) -> str:
    """Run 1: commit MEMORY.md as a symlink to ``target`` while the working tree holds real notes
    (so the notes are kept for the reply), then ask a question."""
    return (
        f"ln -s {target} MEMORY.md && git add -f MEMORY.md && git -c user.name=x -c user.email=x@x commit -qm link"
        " && git update-index --skip-worktree MEMORY.md && rm MEMORY.md && echo 'my notes' > MEMORY.md"
        " && git log --oneline -1 && ls -la"
    )


def memory_script(target: str):
    def script(body, i):
        text = str(body["messages"][0]["content"])
        if "Their answer" in text:  # resumed: the agent has written the notes back by now
            return [fa.tool_use("Bash", {"command": "ls -la MEMORY.md; cat MEMORY.md"}), fa.text("done")][i]
        return [
            fa.tool_use("Bash", {"command": plant_memory_symlink(target)}),
            fa.text("<clarification>Which one?</clarification>"),
        ][i]

    return script


def fingerprint(path: str) -> tuple:
    st = os.stat(path)
    data = b""
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            data = f.read()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_rdev, data


async def _resume_through_symlink(tmp: str, target: str, **overrides) -> None:
    repo = make_git_repo(os.path.join(tmp, "repo"))
    async with fa.open_fake_anthropic(memory_script(target)) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url, **overrides)
        async with run_marathon(config) as mt:
            task = await mt.submit("remember", repo=repo)
            await mt.wait_state(task["id"], {"needs_input", "failed", "succeeded"})
            first = await mt.task(task["id"])
            assert first["state"] == "needs_input", first
            r = await mt.client.post(f"/v1/tasks/{task['id']}/reply", json={"answer": "the blue one"})
            assert r.status_code == 202, r.text
            final = await mt.finish(task["id"])
            assert final["state"] == "succeeded", final
            results = [e["data"]["summary"] for e in await mt.events(task["id"], follow=False)
                       if e["event"] == "tool_result"]  # fmt: skip
            # the notes came back as a regular file in the workspace, not through the link
            assert any(r.startswith("-rw") and "my notes" in r for r in results), results


async def test_memory_symlink_to_a_device_changes_nothing_on_resume():
    before = fingerprint("/dev/zero")
    await _resume_through_symlink(scratch_dir(), "/dev/zero")
    assert fingerprint("/dev/zero") == before


async def test_memory_symlink_to_a_host_file_in_the_plain_fallback_changes_nothing():
    tmp = scratch_dir()
    victim = os.path.join(tmp, "victim.conf")
    with open(victim, "w") as f:
        f.write("original\n")
    os.chmod(victim, 0o600)
    before, zero = fingerprint(victim), fingerprint("/dev/zero")
    await _resume_through_symlink(tmp, victim, bwrap="off")
    assert fingerprint(victim) == before and fingerprint("/dev/zero") == zero


async def test_plain_fallback_on_a_root_node_runs_a_task():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    script = [fa.tool_use("Write", {"file_path": "out.txt", "content": "plain\n"}), fa.text("ok")]
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url, bwrap="off")
        async with run_marathon(config) as mt:
            assert "NO isolation" in mt.node.backend.info.isolation
            final = await mt.finish((await mt.submit("plain", repo=repo))["id"])
            assert final["state"] == "succeeded", final
            assert "+plain" in (await mt.client.get(f"/v1/tasks/{final['id']}/diff")).text


async def test_claude_found_on_path_as_a_symlink_to_a_versioned_binary(monkeypatch):
    tmp = scratch_dir()
    versions = os.path.join(tmp, "share", "claude", "versions")
    os.makedirs(versions)
    versioned = os.path.join(versions, "2.1.332")
    try:
        os.link(os.path.realpath(claude_bin()), versioned)
    except OSError:
        os.symlink(os.path.realpath(claude_bin()), versioned)
    bindir = os.path.join(tmp, "bin")
    os.makedirs(bindir)
    os.symlink(versioned, os.path.join(bindir, "claude"))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.delenv("MARATHON_CLAUDE_BIN", raising=False)
    assert resolve_claude("") == os.path.realpath(versioned)
    repo = make_git_repo(os.path.join(tmp, "repo"))
    script = [fa.tool_use("Bash", {"command": "echo from-path-claude"}), fa.text("ok")]
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url, claude_bin="")
        async with run_marathon(config) as mt:
            final = await mt.finish((await mt.submit("path", repo=repo))["id"])
            assert final["state"] == "succeeded", final


def test_a_node_without_claude_code_refuses_to_start(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="Claude Code CLI not found"):
        ProcessBackend(bwrap="off", data_dir=str(tmp_path), claude_bin="")
    with pytest.raises(ConfigError, match="not-there"):
        ProcessBackend(bwrap="off", data_dir=str(tmp_path), claude_bin=str(tmp_path / "not-there"))
    assert load_config({}, env={}).claude_bin == ""
