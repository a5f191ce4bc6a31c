"""How events and tasks look in a terminal."""

from __future__ import annotations

import sys
import time

_TTY = sys.stdout.isatty()


def _c(code: str, text: str) -> str:
    return f"\033[{code}m{text}\033[0m" if _TTY else text


def event_line(kind: str, data: dict) -> str | None:
    if kind == "iteration":
        return _c("1;35", f"── iteration {data.get('iteration')} ──")
    if kind == "state":
        extra = f" ({data['reason']})" if data.get("reason") else ""
        msg = f": {data['message']}" if data.get("message") else ""
        return _c("1", f"● {data.get('state')}{extra}{msg}")
    if kind == "text":
        return data.get("text", "").rstrip()
    if kind == "tool_call":
        return _c("36", f"→ {data.get('summary') or data.get('name')}")
    if kind == "tool_result":
        text = f"  ← {data.get('summary', '')}"
        return _c("31", text) if data.get("is_error") else _c("2", text)
    if kind == "log":
        return _c("2", f"· {data.get('message', '')}")
    if kind == "api_request" and (data.get("status", 200) >= 400 or data.get("error")):
        return _c("31", f"· API {data.get('status')}: {data.get('error') or 'error'}")
    return None  # usage and others are shown in the summary


def tokens(usage: dict) -> str:
    i, o = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
    cw, cr = usage.get("cache_creation_input_tokens", 0), usage.get("cache_read_input_tokens", 0)
    s = f"{i + o + cw + cr:,} tokens (in {i:,}, out {o:,}"
    if cw or cr:
        s += f", cache write {cw:,}, cache read {cr:,}"
    s += ")"
    searches, fetches = usage.get("web_search_requests", 0), usage.get("web_fetch_requests", 0)
    if searches or fetches:
        s += f" + {searches:,} web searches" + (f", {fetches:,} web fetches" if fetches else "")
    return s


def duration(task: dict) -> str:
    d = task.get("duration_s")
    if d is None and task.get("started_at"):
        d = (task.get("finished_at") or time.time()) - task["started_at"]
    return f"{d:.1f}s" if d is not None else "-"


def summary(task: dict) -> str:
    state = task["state"]
    color = "32" if state == "succeeded" else "31" if task.get("terminal") else "33"
    lines = [_c("1;" + color, f"{state}") + (f" ({task['reason']})" if task.get("reason") else "")]
    if task.get("message") and state != "succeeded":
        lines.append(f"  {task['message']}")
    lines.append(
        f"  task {task['id']} · {duration(task)} · {task.get('num_turns', 0)} turns · {tokens(task.get('usage') or {})}"
    )
    if task.get("cost_usd") is not None:
        lines.append(f"  cost ${task['cost_usd']:.4f}")
    if task.get("diff_stat"):
        lines.append("  " + task["diff_stat"].replace("\n", "\n  "))
    if task.get("commits"):
        lines.append(f"  {task['commits']} commit(s) on {task.get('branch')} (marathon fetch {task['id']})")
    if task.get("pr_url"):
        lines.append(f"  pull request: {task['pr_url']}")
    elif task.get("pr_error"):
        lines.append(f"  pull request: {task['pr_error']}")
    if task.get("question"):
        lines.append(f'  question: {task["question"]}\n  answer with: marathon reply {task["id"]} "…"')
    return "\n".join(lines)


def status(task: dict) -> str:
    rows = [
        ("task", task["id"]),
        ("state", task["state"]),
        ("reason", task.get("reason")),
        ("message", task.get("message")),
        ("prompt", (task.get("request") or {}).get("prompt", "")[:200]),
        ("repo", (task.get("request") or {}).get("repo")),
        ("node", task.get("node_id")),
        ("attempt", task.get("attempt")),
        ("created", _ts(task.get("created_at"))),
        ("started", _ts(task.get("started_at"))),
        ("finished", _ts(task.get("finished_at"))),
        ("duration", duration(task)),
        ("turns", task.get("num_turns")),
        ("tokens", tokens(task.get("usage") or {})),
        ("claude", tokens(task["claude_usage"]) + " as Claude Code reported" if task.get("claude_usage") else None),
        ("cost", f"${task['cost_usd']:.4f}" if task.get("cost_usd") is not None else None),
        ("iterations", task.get("iterations") or None),
        (
            "branch",
            f"{task['branch']} ({task.get('commits', 0)} commits, head {(task.get('head') or '')[:10]})"
            if task.get("branch")
            else None,
        ),
        ("pr", task.get("pr_url") or task.get("pr_error")),
        ("question", task.get("question")),
        ("changes", task.get("diff_stat")),
    ]
    return "\n".join(f"{k:>10}  {v}" for k, v in rows if v not in (None, ""))


def _ts(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else None


def age(t: float) -> str:
    s = max(0, time.time() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit}"
    return f"{int(s)}s"
