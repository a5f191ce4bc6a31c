"""The ``marathon`` command.  Client commands are thin HTTP clients of the orchestrator."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Literal

import cyclopts
from cyclopts import Parameter

from marathon import __version__, repos
from marathon.cli import render
from marathon.config import DEFAULT_URL, load_config
from marathon.errors import ConfigError, MarathonError

app = cyclopts.App(
    name="marathon",
    version=__version__,
    help=f"Run Claude Code tasks in isolated sandboxes.  The client talks to MARATHON_URL (default {DEFAULT_URL}).",
)

Url = Annotated[str | None, Parameter(help=f"Orchestrator URL (env MARATHON_URL, default {DEFAULT_URL}).")]


def _client(url: str | None):
    from marathon.cli import credentials
    from marathon.cli.client import Client

    cfg = load_config({"url": url})
    token = cfg.token or (credentials.load(cfg.url) or {}).get("token", "")
    return Client(cfg.url, token)


def _fail(msg: str, code: int = 1) -> int:
    print(f"marathon: {msg}", file=sys.stderr)
    return code


@app.command
def serve(
    *,
    role: Literal["orchestrator", "node", "agent", "all"] = "all",
    http: str | None = None,
    gateway: str | None = None,
    orchestrator: str | None = None,
    data_dir: str | None = None,
    slots: int | None = None,
    sandbox: Literal["process", "qemu", "firecracker"] | None = None,
    listen: str | None = None,
    log_level: str | None = None,
):
    """Run a Marathon daemon.

    Parameters
    ----------
    role
        orchestrator (API, scheduler, node gateway), node (runs sandboxes), agent (inside a
        sandbox), or all (orchestrator + node in one process, embedded stores).
    http
        API listen address, e.g. tcp:127.0.0.1:8600 (orchestrator, all).
    gateway
        Node gateway listen address, e.g. tcp:0.0.0.0:8601 (orchestrator, all).
    orchestrator
        Gateway address a node dials, e.g. tcp:orch.example:8601 (node).
    data_dir
        Where state lives (database, workspaces, node id and secret).
    slots
        Tasks this node runs at once.
    sandbox
        Sandbox backend for the node.
    listen
        Address the agent listens on (agent), e.g. unix:/run/marathon/agent.sock or vsock:4294967295:1024.
    log_level
        debug, info, warning or error.
    """
    from marathon.cli.serve import run_serve

    flags = {
        "http_listen": http,
        "gateway_listen": gateway,
        "orchestrator": orchestrator,
        "data_dir": data_dir,
        "slots": slots,
        "sandbox": sandbox,
        "log_level": log_level,
    }
    try:
        return run_serve(role, flags, listen)
    except ConfigError as exc:
        return _fail(str(exc), 2)


@app.command
def run(
    prompt: str,
    *,
    repo: str | None = None,
    branch: str | None = None,
    model: str | None = None,
    max_turns: int | None = None,
    timeout: float | None = None,
    max_tokens: int | None = None,
    max_cost: float | None = None,
    max_iterations: int = 1,
    promise: str | None = None,
    verify: str | None = None,
    base: str | None = None,
    branch_name: str | None = None,
    pr: bool = False,
    pr_title: str | None = None,
    keep_workspace: bool = False,
    memory: str | None = None,
    cpus: float | None = None,
    disk: str | None = None,
    detach: bool = False,
    cancel_on_interrupt: bool = False,
    url: Url = None,
) -> int:
    """Submit a task, stream it live, and exit 0 only if it succeeded.

    Parameters
    ----------
    prompt
        What Claude Code should do.
    repo
        A git repository: an https or ssh URL, owner/name on GitHub, or a local path (on the node).
    branch
        Branch to start from (default: the repository's default branch).
    model
        Claude model to use.
    max_turns
        Upper bound on agent turns.
    timeout
        Wall-clock limit for the whole task, in seconds.
    max_tokens
        Token budget (all tokens of all API requests); the task ends budget_exhausted beyond it.
    max_cost
        Cost budget in USD.
    max_iterations
        Run Claude Code up to N times until the job is done (see --promise, --verify).
    promise
        Completion promise: the task is done only when Claude prints <promise>TEXT</promise>.
    verify
        A command (e.g. "pytest -q") that must exit 0 before a claimed completion counts.
    base
        Base branch of the pull request (default: the branch the work started from).
    branch_name
        Name of the work branch (default marathon/<short task id>).
    pr
        Push the work branch and open a pull request (needs your GitHub token: marathon github-token).
    pr_title
        Pull request title (default: the last commit's first line).
    keep_workspace
        Keep the sandbox's workspace on the node after the task.
    memory
        Memory limit of the sandbox, e.g. 2GiB (default: the node's; capped at the node's maximum).
    cpus
        CPU limit of the sandbox in cores, e.g. 1.5.
    disk
        Disk limit for the workspace, HOME and TMPDIR together, e.g. 20GiB.
    detach
        Print the task id and return at once.
    cancel_on_interrupt
        On Ctrl-C, cancel the task without asking.
    """
    from marathon.cli.client import ApiError

    if not prompt.strip():
        return _fail("the prompt is empty", 2)
    if repo and _looks_local(repo):
        path = os.path.abspath(os.path.expanduser(repos.local_path(repo)))
        if not os.path.isdir(path):
            return _fail(f"repository {repo!r} does not exist", 2)
        if not (os.path.exists(os.path.join(path, ".git")) or os.path.exists(os.path.join(path, "HEAD"))):
            return _fail(f"{repo!r} is not a git repository", 2)
        repo = path
    body = {
        "prompt": prompt,
        "repo": repo,
        "branch": branch,
        "model": model,
        "max_turns": max_turns,
        "timeout": timeout,
        "max_tokens": max_tokens,
        "max_cost": max_cost,
        "max_iterations": max_iterations,
        "promise": promise,
        "verify": verify,
        "base": base,
        "branch_name": branch_name,
        "pr": pr,
        "pr_title": pr_title,
        "keep_workspace": keep_workspace,
        "memory_limit": memory,
        "cpu_limit": cpus,
        "disk_limit": disk,
    }
    client = _client(url)
    try:
        task = client.post("/v1/tasks", {k: v for k, v in body.items() if v is not None})
    except ApiError as exc:
        return _fail(exc.message, 2 if exc.status in (400, 401, 403, 404, 429) else 1)
    print(f"task {task['id']} queued", flush=True)
    if detach:
        print(task["id"])
        return 0
    return _follow(client, task["id"], cancel_on_interrupt=cancel_on_interrupt, summary=True)


def _looks_local(repo: str) -> bool:
    """A path here (made absolute before it is sent), not a URL and not GitHub's owner/name
    shorthand (``./owner/name`` for a directory of that name): ``marathon.repos.classify``."""
    return repos.classify(os.path.expanduser(repo)) in ("local", "relative")


def _follow(client, task_id: str, *, cancel_on_interrupt: bool, summary: bool, after: int = 0) -> int:
    seen = after
    try:
        for ev in client.events(task_id, after=after):
            seen = ev.id
            line = render.event_line(ev.kind, ev.data)
            if line:
                print(line, flush=True)
            if ev.kind == "state" and ev.data.get("state") == "needs_input":
                break  # the task waits for `marathon reply`: nothing more will come until then
    except KeyboardInterrupt:
        if cancel_on_interrupt or _ask_cancel():
            client.post(f"/v1/tasks/{task_id}/cancel")
            print(f"\ncancelling task {task_id}", file=sys.stderr)
            return _follow(client, task_id, cancel_on_interrupt=True, summary=summary, after=seen)
        print(f"\ndetached; follow again with: marathon logs -f {task_id}", file=sys.stderr)
        return 130
    task = client.get(f"/v1/tasks/{task_id}")
    if summary:
        print(render.summary(task))
    return 0 if task["state"] == "succeeded" else 1


def _ask_cancel() -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        answer = input("\ncancel the task (c) or detach (d)? [d] ").strip().lower()
    except (EOFError, KeyboardInterrupt):
        return False
    return answer.startswith("c")


@app.command
def status(task_id: str, *, json_output: Annotated[bool, Parameter(name="--json")] = False, url: Url = None) -> int:
    """Show a task's state, usage and result."""
    task = _client(url).get(f"/v1/tasks/{task_id}")
    print(json.dumps(task, indent=2) if json_output else render.status(task))
    return 0


@app.command
def logs(task_id: str, *, follow: Annotated[bool, Parameter(name=["--follow", "-f"])] = False, url: Url = None) -> int:
    """Print a task's events; with -f, keep following until it ends."""
    from marathon.cli.client import ApiError

    client = _client(url)
    try:
        for ev in client.events(task_id, follow=follow):
            line = render.event_line(ev.kind, ev.data)
            if line:
                print(line, flush=True)
    except ApiError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        return 130
    return 0


@app.command
def cancel(task_id: str, *, url: Url = None) -> int:
    """Cancel a task (the sandbox is killed)."""
    task = _client(url).post(f"/v1/tasks/{task_id}/cancel")
    print(f"task {task_id}: {task['state']}" + ("" if task.get("terminal") else " (cancel sent)"))
    return 0


@app.command
def tasks(*, state: str | None = None, limit: int = 20, url: Url = None) -> int:
    """List your tasks, newest first (--state running,queued)."""
    page = _client(url).get("/v1/tasks", params={"limit": limit, **({"state": state} if state else {})})
    for t in page["tasks"]:
        prompt = " ".join(t["request"]["prompt"].split())
        print(f"{t['id']}  {t['state']:<11} {render.age(t['created_at']):>4}  {prompt[:70]}")
    if not page["tasks"]:
        print("no tasks")
    return 0


@app.command
def diff(task_id: str, *, url: Url = None) -> int:
    """Print the change the agent made, as a patch."""
    resp = _client(url).request("GET", f"/v1/tasks/{task_id}/diff")
    sys.stdout.write(resp.text)
    return 0


@app.command
def nodes(*, url: Url = None) -> int:
    """List nodes and their capacity."""
    data = _client(url).get("/v1/nodes")
    for n in data["nodes"]:
        state = "up" if n["connected"] else "down"
        pool = n.get("pool") or {}
        extra = ""
        if pool.get("hits") or pool.get("misses") or pool.get("note"):
            claim = f", claim p50 {pool['claim_ms_p50']:.1f} ms" if pool.get("claim_ms_p50") is not None else ""
            extra = f"  pool {pool['hits']} hits / {pool['misses']} misses{claim}" + (
                f" ({pool['note']})" if pool.get("note") else ""
            )
        print(
            f"{n['id']}  {n['name']:<20} {state:<5} {n['active']}/{n['slots']} busy  warm {n['warm']}  {n['backend']}{extra}"
        )
    if not data["nodes"]:
        print("no nodes")
    return 0


from marathon.cli import accounts as _accounts  # noqa: E402,F401  (registers login, keys, usage…)
from marathon.cli import work as _work  # noqa: E402,F401  (registers reply, fetch, github-token)
from marathon.cli import admin as _admin  # noqa: E402,F401  (registers admin …)


def main() -> None:
    """Every command's errors end here: an API error or a bad setting is one line on stderr
    and exit status 1 (commands return 2 themselves where the request was refused)."""
    try:
        app()
    except MarathonError as exc:
        sys.exit(_fail(str(exc)))
