"""What users give a task and what comes back, at their limits:

- repositories: ``owner/name`` is always GitHub even when that relative path exists on the
  node; a non-administrator's loopback/private URL or local path is refused (at submit, and
  on the node); node-side git runs without the node's environment;
- prompts: ``--help`` is text, not an option; 1 MB of UTF-8 arrives intact; beyond the byte
  limit a clear 400; the prompt never shows in the host's process list;
- a 9 MB UTF-8 diff: the diff is capped in bytes, the commits are all kept;
- the completion promise, with the real CLI: the first <promise> of the final text block counts.
"""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from marathon.node.git import resolve_repo
from marathon.node.repo import remote_config
from marathon.errors import RepoError
from marathon.protocol import messages as m
from tests import fake_anthropic as fa
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow


async def user_client(mt, email: str = "user@example.com") -> httpx.AsyncClient:
    """A non-administrator, registered by the administrator."""
    password = "correct horse battery staple"
    r = await mt.client.post("/v1/auth/register", json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    async with httpx.AsyncClient(base_url=mt.url, trust_env=False) as c:
        token = (await c.post("/v1/auth/login", json={"email": email, "password": password})).json()["token"]
    return httpx.AsyncClient(base_url=mt.url, trust_env=False, timeout=30, headers={"Authorization": f"Bearer {token}"})


def prompt_of(body: dict) -> str:
    """The user's prompt: the last text block of the first message (Claude Code puts its
    system reminders before it)."""
    content = body["messages"][0]["content"]
    if isinstance(content, str):
        return content
    texts = [b.get("text", "") for b in content if b.get("type") == "text"]
    return texts[-1] if texts else ""


# ------------------------------------------------------------------------------ repositories


def test_owner_name_is_github_even_where_that_path_exists(tmp_path, monkeypatch):
    make_git_repo(str(tmp_path / "proj" / "secret"), {"SECRET.txt": "node-local\n"})
    monkeypatch.chdir(tmp_path)
    ref = resolve_repo("proj/secret", "https://github.example")
    assert ref.url == "https://github.example/proj/secret.git" and ref.github == ("proj", "secret") and not ref.local
    with pytest.raises(RepoError, match="for administrators"):
        resolve_repo(str(tmp_path / "proj" / "secret"), trusted=False)
    assert resolve_repo(str(tmp_path / "proj" / "secret"), trusted=True).local


async def test_the_node_refuses_a_non_administrators_private_remote():
    url = "http://127.0.0.1:8600/x.git"
    spec = m.TaskSpec(task_id="a" * 12, request=m.TaskRequest(prompt="x", repo=url), trusted_repo=False)
    config = marathon_config(scratch_dir())
    with pytest.raises(RepoError, match="non-public address"):
        await remote_config(resolve_repo(url, trusted=False), spec, config)
    # an allow-listed host passes, unpinned, with redirects and local transports still off
    allowed = marathon_config(scratch_dir(), repo_hosts=["127.0.0.1"])
    pairs = dict(await remote_config(resolve_repo(url, trusted=False), spec, allowed))
    assert pairs["http.followRedirects"] == "false" and pairs["protocol.allow"] == "never"
    assert "http.curloptResolve" not in pairs


async def test_repository_access_for_a_user_who_is_not_an_administrator(monkeypatch):
    tmp = scratch_dir()
    make_git_repo(os.path.join(tmp, "proj", "secret"), {"SECRET.txt": "node-local\n"})
    monkeypatch.chdir(tmp)  # the node's working directory holds proj/secret
    async with fa.open_fake_anthropic([fa.text("ok")]) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url,
                                 github_url="http://127.0.0.1:9")  # fmt: skip
        async with run_marathon(config) as mt, await user_client(mt) as user:
            for repo, status, words in (
                ("http://127.0.0.1:8600/x.git", 403, "non-public address"),
                ("http://localhost/x.git", 403, "non-public address"),
                ("git@127.0.0.1:x.git", 403, "non-public address"),
                (os.path.join(tmp, "proj", "secret"), 403, "for administrators"),
                (f"file://{tmp}/proj/secret", 403, "for administrators"),
                ("proj/secret/deeper", 400, "absolute path"),
            ):
                r = await user.post("/v1/tasks", json={"prompt": "x", "repo": repo})
                assert r.status_code == status and words in r.text, (repo, r.status_code, r.text)
            # owner/name goes to the GitHub host, never to the node's proj/secret
            r = await user.post("/v1/tasks", json={"prompt": "x", "repo": "proj/secret"})
            assert r.status_code == 201, r.text
            final = await mt.finish(r.json()["id"])
            assert final["state"] == "failed" and final["reason"] == "repo_error", final
            assert "127.0.0.1:9" in final["message"], final["message"]


# ------------------------------------------------------------------------------ prompts and diffs


async def test_prompts_as_text_on_stdin_and_the_byte_limit():
    tmp = scratch_dir()
    seen: list[str] = []
    in_ps: list[str] = []
    big = "é" * 500_000  # 1,000,000 bytes of UTF-8

    def script(body, i):
        text = prompt_of(body)
        seen.append(text)
        for pid in filter(str.isdigit, os.listdir("/proc")):  # Claude Code is running right now
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"PROMPT-MARKER" in f.read():
                        in_ps.append(pid)
            except OSError:
                pass
        return fa.text("ok")

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            for prompt in ("--help PROMPT-MARKER", big):
                final = await mt.finish((await mt.submit(prompt))["id"])
                assert final["state"] == "succeeded", final
            assert any(s.startswith("--help PROMPT-MARKER") for s in seen), [s[:80] for s in seen]
            assert any(big in s for s in seen), "the 1 MB prompt did not arrive whole"
            assert not in_ps, "the prompt showed in the host's process list"
            r = await mt.client.post("/v1/tasks", json={"prompt": "x" * (1024 * 1024 + 1)})
            assert r.status_code == 400 and "bytes" in r.json()["error"]["message"], r.text


async def test_a_9_mb_utf8_diff_is_capped_and_the_commits_are_kept():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    write = "python3 -c \"open('big.txt', 'w').write(('é' * 99 + chr(10)) * 45000)\" && wc -c big.txt"
    script = [fa.tool_use("Bash", {"command": write}), fa.text("wrote it")]
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            final = await mt.finish((await mt.submit("big diff", repo=repo))["id"])
            assert final["state"] == "succeeded" and final["commits"] == 1, final
            diff = (await mt.client.get(f"/v1/tasks/{final['id']}/diff")).content
            assert len(diff) <= 4 * 1024 * 1024 and b"diff truncated" in diff
            diff.decode("utf-8")  # cut at a character boundary
            bundle = (await mt.client.get(f"/v1/tasks/{final['id']}/bundle")).content
            path = os.path.join(tmp, "result.bundle")
            with open(path, "wb") as f:
                f.write(bundle)
            out = os.path.join(tmp, "out")
            subprocess.run(["git", "clone", "-q", repo, out], check=True)
            subprocess.run(["git", "-C", out, "fetch", "-q", path, f"{final['branch']}:{final['branch']}"], check=True)
            subprocess.run(["git", "-C", out, "checkout", "-q", final["branch"]], check=True)
            assert os.path.getsize(os.path.join(out, "big.txt")) == 45000 * (99 * 2 + 1)


# ------------------------------------------------------------------------------ the promise

CASES = {
    # prompt: (final turn(s), promise, succeeds)
    "inline": ([fa.text("Finished. <promise>DONE</promise>")], "DONE", True),
    "whitespace": ([fa.text("All good.\n<promise>\n   ALL \t  DONE \n</promise>\n")], "ALL DONE", True),
    "wrong case": ([fa.text("<promise>done</promise>")], "DONE", False),
    "first only": ([fa.text("<promise>NOT YET</promise> and <promise>DONE</promise>")], "DONE", False),
    "tool result": (
        [fa.tool_use("Bash", {"command": "echo '<promise>DONE</promise>'"}), fa.text("checked")],
        "DONE",
        False,
    ),
    "earlier message": (
        [fa.turn("<promise>DONE</promise>", fa.tool_use("Bash", {"command": "true"})), fa.text("one more thing")],
        "DONE",
        False,
    ),
    "not the final block": ([fa.turn("<promise>DONE</promise>", "and a last word")], "DONE", False),
    "echoed prompt <promise>DONE</promise>": ([fa.text("I read the prompt.")], "DONE", False),
}


async def test_completion_promise_cases_with_the_real_cli():
    tmp = scratch_dir()

    def script(body, i):
        text = prompt_of(body)
        for name, (turns, _, _) in CASES.items():
            if text.startswith(f"case {name}"):
                return turns[i]
        raise AssertionError(text[:100])

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url, slots=2)
        async with run_marathon(config) as mt:
            tasks = {name: await mt.submit(f"case {name}", promise=promise, max_iterations=1)
                     for name, (_, promise, _) in CASES.items()}  # fmt: skip
            outcome = {}
            for name, t in tasks.items():
                final = await mt.finish(t["id"], timeout=120)
                outcome[name] = final["state"]
            want = {name: "succeeded" if ok else "failed" for name, (_, _, ok) in CASES.items()}
            assert outcome == want, json.dumps(outcome, indent=1)
