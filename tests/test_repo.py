"""Repositories in, commits and pull requests out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from tests import fake_anthropic as fa
from tests.fake_github import open_fake_github
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow
GH_TOKEN = "ghp_" + "t" * 36


def git(*args, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def bare_remote(tmp: str, owner: str, name: str) -> str:
    src = make_git_repo(os.path.join(tmp, f"src-{name}"), {"README.md": "# api\n", "app.py": "print('hi')\n"})
    bare = os.path.join(tmp, "remotes", owner, f"{name}.git")
    os.makedirs(os.path.dirname(bare), exist_ok=True)
    git("clone", "--bare", "--quiet", src, bare)
    return bare


def writer_script(path: str, content: str):
    return [
        fa.tool_use(
            "Bash",
            {
                "command": "env > sandbox-env.txt; git config --list --show-origin > sandbox-git.txt 2>&1; ls -la ~ >> sandbox-env.txt"
            },
        ),
        fa.tool_use("Write", {"file_path": path, "content": content}),
        fa.text("Added it."),
    ]


async def test_pull_request_through_fake_github_and_token_stays_on_the_node():
    tmp = scratch_dir()
    bare = bare_remote(tmp, "acme", "api")
    async with (
        fa.open_fake_anthropic(lambda b, i: writer_script("FEATURE.md", "# feature\n")[i]) as fake,
        open_fake_github(GH_TOKEN, os.path.join(tmp, "remotes")) as gh,
    ):
        config = marathon_config(
            os.path.join(tmp, "data"),
            anthropic_base_url=fake.url,
            github_url=f"file://{tmp}/remotes",
            github_api_url=gh.url,
        )
        async with run_marathon(config) as mt:
            r = await mt.client.put("/v1/auth/github-token", json={"token": GH_TOKEN})
            assert r.status_code == 200
            task = await mt.submit("add FEATURE.md", repo="acme/api", pr=True)
            final = await mt.finish(task["id"])
            assert final["state"] == "succeeded", final
            assert final["pr_url"] == "https://github.example/acme/api/pull/1", final
            pr = gh.pulls[0]
            branch = f"marathon/{task['id'][:8]}"
            assert pr["head"] == branch and pr["base"] == "main" and pr["repo"] == "acme/api"
            assert pr["title"].startswith(f"marathon: task {task['id']} iteration 1")  # the last commit's subject
            assert task["id"] in pr["body"] and "add FEATURE.md" in pr["body"] and "cost: $" in pr["body"]
            assert gh.requests[0]["headers"]["authorization"] == f"Bearer {GH_TOKEN}"
            # the branch really is on the remote, with the work
            assert git("--git-dir", bare, "show", f"{branch}:FEATURE.md") == "# feature"
            # the token never entered the sandbox: not in its environment, its git config, its files, or anywhere in the work
            diff = (await mt.client.get(f"/v1/tasks/{task['id']}/diff")).text
            assert "sandbox-env.txt" in diff and "sandbox-git.txt" in diff
            assert GH_TOKEN not in diff and "x-access-token" not in diff
            events = (await mt.client.get(f"/v1/tasks/{task['id']}/events", params={"follow": "0"})).text
            assert GH_TOKEN not in events
            # the orchestrator's database holds the token only encrypted (read raw, with sqlite3)
            db = os.path.join(config.data_dir, "marathon.db")
            dump = subprocess.run(["sqlite3", db, ".dump"], check=True, capture_output=True).stdout
            assert b"mse1:" in dump and GH_TOKEN.encode() not in dump

            # a second PR for an existing one: GitHub says 422, the task reports it and keeps its commits
            gh.force_status = 422
            task2 = await mt.submit("add OTHER.md", repo="acme/api", pr=True)
            final2 = await mt.finish(task2["id"])
            assert final2["state"] == "succeeded" and final2["pr_url"] is None
            assert "422" in final2["pr_error"] and "already exists" in final2["pr_error"]
            assert final2["commits"] == 1
            r = await mt.client.get(f"/v1/tasks/{task2['id']}/bundle")
            assert r.status_code == 200 and r.content.startswith(b"# v2 git bundle")

            # without a token the PR is refused clearly, work kept
            gh.force_status = None
            await mt.client.put("/v1/auth/github-token", json={"token": None})
            task3 = await mt.submit("add THIRD.md", repo="acme/api", pr=True, branch_name="feature/third")
            final3 = await mt.finish(task3["id"])
            assert final3["branch"] == "feature/third" and final3["commits"] == 1
            assert "no GitHub token" in final3["pr_error"]


async def test_repo_sources_mirror_cache_fetch_and_keep_workspace():
    tmp = scratch_dir()
    src = make_git_repo(os.path.join(tmp, "src"), {"README.md": "# r\n"})
    git("checkout", "-q", "-b", "dev", cwd=src)
    with open(os.path.join(src, "dev.txt"), "w") as f:
        f.write("dev only\n")
    git("add", "dev.txt", cwd=src)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "dev", cwd=src)
    git("checkout", "-q", "main", cwd=src)

    def script(body, i):
        return [
            fa.tool_use("Bash", {"command": "ls; git branch --show-current"}),
            fa.tool_use("Write", {"file_path": "out.txt", "content": "work\n"}),
            fa.text("ok"),
        ][i]

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            cache = mt.node.cache
            # a local path
            t1 = await mt.finish((await mt.submit("a", repo=src))["id"])
            assert t1["state"] == "succeeded", t1
            assert (cache.clones, cache.fetches) == (1, 0)
            # the same repository as a file:// URL is another cache entry
            t2 = await mt.finish((await mt.submit("b", repo=f"file://{src}", branch="dev"))["id"])
            assert t2["state"] == "succeeded" and (cache.clones, cache.fetches) == (2, 0)
            evs = await mt.events(t2["id"], follow=False)
            outs = [e["data"]["summary"] for e in evs if e["event"] == "tool_result"]
            assert "dev.txt" in outs[0] and "marathon/" in outs[0]  # started from --branch dev, on the work branch
            # a second task on the same repository does not clone again: it fetches
            t3 = await mt.finish((await mt.submit("c", repo=src, keep_workspace=True))["id"])
            assert t3["state"] == "succeeded" and (cache.clones, cache.fetches) == (2, 1)
            logs = [e["data"]["message"] for e in await mt.events(t3["id"], follow=False) if e["event"] == "log"]
            assert any("cache hit, fetched" in x for x in logs)
            kept = os.path.join(config.data_dir, "sandboxes", t3["id"], "workspace")
            assert os.path.exists(os.path.join(kept, "out.txt"))
            assert not os.path.exists(os.path.join(config.data_dir, "sandboxes", t1["id"]))
            # the node's own state (other tasks' mirrors and workspaces) is never a repository, even for an admin
            mirror = os.path.join(config.data_dir, "mirrors", os.listdir(os.path.join(config.data_dir, "mirrors"))[0])
            t5 = await mt.finish((await mt.submit("steal", repo=f"file://{mirror}"))["id"])
            assert t5["state"] == "failed" and "node's own state" in t5["message"]
            # a missing branch is a clear failure
            t4 = await mt.finish((await mt.submit("d", repo=src, branch="nope"))["id"])
            assert t4["state"] == "failed" and t4["reason"] == "repo_error" and "'nope' does not exist" in t4["message"]

            # marathon fetch: the commits into a local clone as marathon/<id>
            clone = os.path.join(tmp, "clone")
            git("clone", "-q", src, clone)
            res = await trio.run_process(
                [sys.executable, "-m", "marathon", "fetch", t1["id"], "--into", clone],
                env={**os.environ, "MARATHON_URL": mt.url},
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert res.returncode == 0, res.stderr
            assert git("show", f"marathon/{t1['id']}:out.txt", cwd=clone) == "work"
            assert git("rev-parse", f"marathon/{t1['id']}", cwd=clone) == t1["head"]
