"""reply, fetch, github-token: the work side of the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from marathon.cli.app import Url, api_client, app, fail, follow


@app.command
def reply(task_id: str, answer: str, *, detach: bool = False, url: Url = None) -> int:
    """Answer a task's question (state needs_input); it continues on the same work."""
    from marathon.cli.client import ApiError

    client = api_client(url)
    try:
        client.post(f"/v1/tasks/{task_id}/reply", {"answer": answer})
    except ApiError as exc:
        return fail(exc.message, 2 if exc.status in (400, 404, 409) else 1)
    print(f"task {task_id} queued again", flush=True)
    if detach:
        return 0
    last = max((e.id for e in client.events(task_id, follow=False)), default=0)
    return follow(client, task_id, cancel_on_interrupt=False, summary=True, after=last - 1 if last else 0)


@app.command
def fetch(task_id: str, *, into: str = ".", url: Url = None) -> int:
    """Fetch a task's commits into a local clone as branch marathon/<id>.

    Parameters
    ----------
    into
        A clone of the task's repository (default: the current directory).
    """
    client = api_client(url)
    task = client.get(f"/v1/tasks/{task_id}")
    data = client.request("GET", f"/v1/tasks/{task_id}/bundle").content
    if subprocess.run(["git", "-C", into, "rev-parse", "--git-dir"], capture_output=True).returncode != 0:
        return fail(f"{into} is not a git repository", 2)
    branch = f"marathon/{task_id}"
    with tempfile.NamedTemporaryFile(suffix=".bundle", delete=False) as f:
        f.write(data)
    try:
        res = subprocess.run(
            ["git", "-C", into, "fetch", "--quiet", f.name, f"refs/heads/{task['branch']}:refs/heads/{branch}"],
            capture_output=True,
            text=True,
        )
    finally:
        os.unlink(f.name)
    if res.returncode != 0:
        return fail(f"git fetch failed: {res.stderr.strip()}")
    print(f"fetched {task['commits']} commit(s) into {branch} ({task['head'][:10]})")
    return 0


@app.command(name="github-token")
def github_token(*, clear: bool = False, url: Url = None) -> int:
    """Store your GitHub token on the orchestrator (read from GITHUB_TOKEN or standard input).

    Nodes use it to clone private repositories, push work branches and open pull requests;
    it never enters a sandbox.
    """
    token = None if clear else (os.environ.get("GITHUB_TOKEN") or sys.stdin.readline().strip())
    if not clear and not token:
        return fail("no token: set GITHUB_TOKEN or pipe it on standard input", 2)
    res = api_client(url).request("PUT", "/v1/auth/github-token", json={"token": token}).json()
    print(f"GitHub token {res['github_token']}")
    return 0


@app.command
def doctor(*, data_dir: str | None = None, node: bool = True, client: bool = True, verify: bool = False,
           url: Url = None) -> int:  # fmt: skip
    """What this host can run and enforce, and whether this client reaches its orchestrator.

    Parameters
    ----------
    node
        Check this host as a node (virtualisation, VMMs, guest image, bubblewrap, seccomp, limits, disk, Claude Code).
    client
        Check the orchestrator at --url and who you are signed in as.
    verify
        Also hash the guest image against its manifest (slow).
    """
    from marathon.cli.doctor import client_checks, node_checks, render
    from marathon.config import load_config

    cfg = load_config({"data_dir": data_dir, "url": url})
    checks = (node_checks(cfg, verify=verify) if node else []) + (client_checks(cfg) if client else [])
    if not checks:
        return 0
    print(render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0
