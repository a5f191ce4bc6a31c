"""Claude Code's ``--output-format stream-json`` lines, parsed into Marathon events.  Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from marathon.protocol import messages as m

SUMMARY = 200


def short(text: str, limit: int = SUMMARY) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_KEY_ARG = {
    "Bash": "command",
    "Write": "file_path",
    "Edit": "file_path",
    "MultiEdit": "file_path",
    "Read": "file_path",
    "NotebookEdit": "notebook_path",
    "Glob": "pattern",
    "Grep": "pattern",
    "WebFetch": "url",
    "WebSearch": "query",
    "Task": "description",
    "TodoWrite": None,
}


def tool_summary(name: str, args: dict) -> str:
    key = _KEY_ARG.get(name, "")
    if key is None:
        return name
    value = args.get(key) if key else next((v for v in args.values() if isinstance(v, str)), None)
    return f"{name} {short(str(value), 160)}" if value else name


def result_summary(content) -> str:
    if isinstance(content, list):
        content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
    return short(str(content or ""))


@dataclass
class RunResult:
    """What the final ``result`` line says."""

    subtype: str = ""
    is_error: bool = False
    num_turns: int = 0
    result: str = ""
    usage: m.Usage = field(default_factory=m.Usage)
    session_id: str = ""


def _usage(obj: dict | None) -> m.Usage:
    obj = obj or {}
    return m.Usage(
        **{f: int(obj.get(f) or 0) for f in m.TOKEN_FIELDS},
        **{k: int(v) for k, v in (obj.get("server_tool_use") or {}).items() if k in m.SERVER_TOOL_FIELDS and v},
    )


class StreamParser:
    """Feed lines; get events.  Remembers the final result and the final assistant message's
    text blocks (stream-json sends one ``assistant`` line per content block, each carrying the
    message's id: a new id starts a new message)."""

    def __init__(self) -> None:
        self.result: RunResult | None = None
        self.last_text = ""  # the last non-empty text block of any assistant message
        self.message_id: str | None = None
        self.message_texts: list[str] = []  # text blocks of the latest assistant message
        self.session_id = ""
        self.model = ""
        self.bad_lines = 0

    def line(self, raw: str | bytes) -> list[m.Event]:
        raw = raw.strip()
        if not raw:
            return []
        try:
            obj = json.loads(raw)
        except ValueError:
            self.bad_lines += 1
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            return [m.LogEvent(message=short(text, 500), level="warning", source="claude")]
        if not isinstance(obj, dict):
            return []
        kind = obj.get("type")
        if kind == "system" and obj.get("subtype") == "init":
            self.session_id = obj.get("session_id", "")
            self.model = obj.get("model", "")
            return [m.LogEvent(message=f"claude started (model {self.model or '?'})", source="claude")]
        if kind == "assistant":
            return self._assistant(obj.get("message") or {})
        if kind == "user":
            return self._user(obj.get("message") or {})
        if kind == "result":
            self.result = RunResult(
                subtype=obj.get("subtype", ""),
                is_error=bool(obj.get("is_error")),
                num_turns=int(obj.get("num_turns") or 0),
                result=str(obj.get("result") or ""),
                usage=_usage(obj.get("usage")),
                session_id=obj.get("session_id", ""),
            )
            return []
        return []

    @property
    def final_text(self) -> str:
        """The final text block of the final assistant message ("" when it had none)."""
        return self.message_texts[-1] if self.message_texts else ""

    def _assistant(self, msg: dict) -> list[m.Event]:
        out: list[m.Event] = []
        msg_id = msg.get("id") if isinstance(msg.get("id"), str) else None
        if msg_id is None or msg_id != self.message_id:
            self.message_id, self.message_texts = msg_id, []
        for block in msg.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                self.message_texts.append(block["text"])
            if block.get("type") == "text" and block.get("text", "").strip():
                self.last_text = block["text"]
                out.append(m.TextEvent(text=block["text"]))
            elif block.get("type") == "tool_use":
                raw = block.get("input")
                args: dict = raw if isinstance(raw, dict) else {}
                out.append(
                    m.ToolCallEvent(
                        tool_id=block.get("id", ""),
                        name=block.get("name", "?"),
                        summary=tool_summary(block.get("name", "?"), args),
                    )
                )
        return out

    def _user(self, msg: dict) -> list[m.Event]:
        out: list[m.Event] = []
        content = msg.get("content")
        if not isinstance(content, list):
            return out
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                out.append(
                    m.ToolResultEvent(
                        tool_id=block.get("tool_use_id", ""),
                        summary=result_summary(block.get("content")),
                        is_error=bool(block.get("is_error")),
                    )
                )
        return out
