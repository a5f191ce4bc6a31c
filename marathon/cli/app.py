"""The cyclopts app every command registers on, and what the commands share: the API client,
errors as one line on stderr, following a task's events."""

from __future__ import annotations

import sys
from typing import Annotated

import cyclopts
from cyclopts import Parameter

from marathon import __version__
from marathon.cli import render
from marathon.config import DEFAULT_URL, load_config

app = cyclopts.App(
    name="marathon",
    version=__version__,
    help=f"Run Claude Code tasks in isolated sandboxes.  The client talks to MARATHON_URL (default {DEFAULT_URL}).",
)

Url = Annotated[str | None, Parameter(help=f"Orchestrator URL (env MARATHON_URL, default {DEFAULT_URL}).")]


def api_client(url: str | None):
    from marathon.cli import credentials
    from marathon.cli.client import Client

    cfg = load_config({"url": url})
    token = cfg.token or (credentials.load(cfg.url) or {}).get("token", "")
    return Client(cfg.url, token)


def fail(msg: str, code: int = 1) -> int:
    print(f"marathon: {msg}", file=sys.stderr)
    return code


def follow(client, task_id: str, *, cancel_on_interrupt: bool, summary: bool, after: int = 0) -> int:
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
        if cancel_on_interrupt or ask_cancel():
            client.post(f"/v1/tasks/{task_id}/cancel")
            print(f"\ncancelling task {task_id}", file=sys.stderr)
            return follow(client, task_id, cancel_on_interrupt=True, summary=summary, after=seen)
        print(f"\ndetached; follow again with: marathon logs -f {task_id}", file=sys.stderr)
        return 130
    task = client.get(f"/v1/tasks/{task_id}")
    if summary:
        print(render.summary(task))
    return 0 if task["state"] == "succeeded" else 1


def ask_cancel() -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        answer = input("\ncancel the task (c) or detach (d)? [d] ").strip().lower()
    except (EOFError, KeyboardInterrupt):
        return False
    return answer.startswith("c")
