"""The iterative loop's pure parts: what counts as done, what the next prompt says."""

from __future__ import annotations

import re
from dataclasses import dataclass

from marathon.protocol.messages import State, stopped_state

MEMORY_FILE = "MEMORY.md"
MEMORY_CAP = 16_000
TAIL = 2_000

_CLARIFY = re.compile(r"(?ms)^[ \t]*<clarification>(.*?)</clarification>[ \t]*$")
_PROMISE = re.compile(r"<promise>(.*?)</promise>", re.S)


def _squash(text: str) -> str:
    return " ".join(text.split())


def promise_kept(final_text: str, promise: str | None) -> bool:
    """The ralph-loop rule: the *first* ``<promise>…</promise>`` element in the final text block
    of the final assistant message, its content trimmed and whitespace runs collapsed to one
    space, equals the promise exactly (case-sensitive).  Anywhere in that block counts
    (``Finished. <promise>DONE</promise>``); a promise in a tool result, an earlier message or
    the prompt does not, since only the final text block is looked at.  Without a promise
    every finished run counts."""
    if promise is None:
        return True
    found = _PROMISE.search(final_text)
    return found is not None and _squash(found.group(1)) == _squash(promise)


def clarification(final_message: str) -> str | None:
    """The question of a ``<clarification>…</clarification>`` element that starts a line."""
    m = _CLARIFY.findall(final_message)
    question = m[-1].strip() if m else ""
    return question or None


def tail(text: str, n: int = TAIL) -> str:
    text = text.strip()
    return text if len(text) <= n else "…" + text[-n:]


def cap_memory(text: str) -> str:
    return text if len(text) <= MEMORY_CAP else text[:MEMORY_CAP] + "\n…(MEMORY.md truncated)"


def instructions(promise: str | None) -> str:
    lines = [f"Keep notes a later iteration will need in {MEMORY_FILE} in the workspace root."]
    if promise is not None:
        lines.append(
            f"When, and only when, the task is completely done, print this on a line by itself:\n<promise>{promise}</promise>"
        )
    lines.append(
        "If you need information only the user can give, print <clarification>your question</clarification> on a line by itself and stop."
    )
    return "\n".join(lines)


@dataclass
class Previous:
    final_message: str = ""
    verify_cmd: str | None = None
    verify_code: int | None = None
    verify_output: str = ""


def first_prompt(prompt: str, *, promise: str | None, looping: bool) -> str:
    """Iteration 1 runs the prompt; when a loop or a promise is configured, it also learns the rules."""
    if not looping and promise is None:
        return prompt
    return f"{prompt}\n\n[Marathon]\n{instructions(promise)}"


def next_prompt(
    *,
    prompt: str,
    iteration: int,
    max_iteration: int,
    promise: str | None,
    previous: Previous,
    memory: str | None,
    reply: str | None = None,
) -> str:
    """The context prefix for iteration 2 and later (and for a resumed task)."""
    parts = [
        f"[Marathon: iteration {iteration} of {max_iteration}]",
        "You are continuing a task you worked on earlier in this same workspace; your earlier changes are committed.",
        f"The task:\n<task>\n{prompt}\n</task>",
    ]
    if previous.final_message.strip():
        parts.append(f"Your previous run ended with:\n<previous>\n{tail(previous.final_message)}\n</previous>")
    if previous.verify_cmd is not None and previous.verify_code not in (None, 0):
        parts.append(
            f"You said the task was done, but the check `{previous.verify_cmd}` failed (exit {previous.verify_code}). "
            f"Its output ends with:\n<check-output>\n{tail(previous.verify_output)}\n</check-output>"
        )
    if memory and memory.strip():
        parts.append(f"Your notes ({MEMORY_FILE}):\n<memory>\n{cap_memory(memory)}\n</memory>")
    if reply is not None:
        parts.append(f"You asked the user a question. Their answer:\n<answer>\n{reply}\n</answer>")
    parts.append("Continue the task.\n" + instructions(promise))
    return "\n\n".join(parts)


# ---------------------------------------------------------------- the iteration decision


@dataclass(frozen=True)
class RunFacts:
    """What one Claude Code run (and the commit after it) came to."""

    cancelled: str | None = None  # the stop reason when the node stopped the task
    has_result: bool = True  # Claude Code printed its final ``result`` line
    subtype: str = ""  # of that line (``error_max_turns``…)
    is_error: bool = False
    exit_code: int | None = 0
    killed_by_signal: int | None = None  # Claude Code died of this signal (e.g. 9: the memory limit)
    final_text: str = ""  # the final text block of the final assistant message
    result_text: str = ""
    stderr_tail: str = ""
    commit_error: str | None = None  # the iteration's commit failed
    disk_full: bool = False  # … because the task's disk was full


@dataclass(frozen=True)
class Verdict:
    """``end`` (with the task's state), ``verify`` (run the check), or ``next`` iteration."""

    action: str
    state: str = ""
    reason: str | None = None
    message: str | None = None


def after_run(facts: RunFacts, *, promise: str | None, verify: str | None, max_turns: int, iteration: int) -> Verdict:
    """What happens after a run: pure, so every path is tested without Claude Code."""
    if facts.cancelled:
        return Verdict("end", stopped_state(facts.cancelled), facts.cancelled, f"stopped: {facts.cancelled}")
    if facts.commit_error:
        if facts.disk_full:
            return Verdict("end", State.FAILED, "disk_exhausted",
                           f"the task's disk is full; the work committed before iteration {iteration} is kept")  # fmt: skip
        return Verdict(
            "end", State.FAILED, "git_error", f"committing iteration {iteration} failed: {facts.commit_error}"
        )
    if facts.killed_by_signal == 9 and not facts.has_result:
        return Verdict(
            "end", State.FAILED, "agent_error", f"Claude Code was killed (signal 9): {facts.stderr_tail[-300:]}"
        )
    if not facts.has_result:
        return Verdict("end", State.FAILED, "agent_error",
                       f"Claude Code exited with {facts.exit_code} without a result: {facts.stderr_tail[-500:]}")  # fmt: skip
    if facts.subtype == "error_max_turns":
        return Verdict("end", State.FAILED, "max_turns", f"reached --max-turns {max_turns} in iteration {iteration}")
    if facts.is_error or facts.exit_code != 0:
        return Verdict("end", State.FAILED, "claude_error", (facts.result_text or facts.stderr_tail)[-500:])
    question = clarification(facts.final_text)
    if question:
        return Verdict("end", State.NEEDS_INPUT, "clarification", question)
    if not promise_kept(facts.final_text, promise):
        return Verdict("next")
    if verify is None:
        return Verdict("end", State.SUCCEEDED)
    return Verdict("verify")


def after_verify(code: int) -> Verdict:
    return Verdict("end", State.SUCCEEDED) if code == 0 else Verdict("next")


def out_of_iterations(*, max_iterations: int, promise: str | None, verify: str | None, verify_failed: bool) -> Verdict:
    if verify and verify_failed:
        what = f"the check `{verify}` never passed"
    elif promise is not None:
        what = f"no <promise>{promise}</promise>"
    else:
        what = "not done"
    return Verdict("end", State.FAILED, "max_iterations", f"{max_iterations} iteration(s) ended with {what}")
