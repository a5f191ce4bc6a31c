"""The iterative loop's pure parts: what counts as done, what the next prompt says."""

from __future__ import annotations

import re
from dataclasses import dataclass

MEMORY_FILE = "MEMORY.md"
MEMORY_CAP = 16_000
TAIL = 2_000

_CLARIFY = re.compile(r"(?ms)^[ \t]*<clarification>(.*?)</clarification>[ \t]*$")


def promise_kept(final_message: str, promise: str | None) -> bool:
    """True when the final assistant message has, on a line of its own, exactly
    ``<promise>PROMISE</promise>``.  A promise quoted inside a sentence, inside code or in a
    tool's output does not count.  Without a promise every finished run counts."""
    if promise is None:
        return True
    want = f"<promise>{promise.strip()}</promise>"
    return any(line.strip() == want for line in final_message.splitlines())


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
