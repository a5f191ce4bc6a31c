"""Reading usage out of Messages API responses as they stream past.  Pure: no I/O.

Usage rule (as the API defines it): ``message_start.message.usage`` gives the initial
counts; every field present in a later ``message_delta.usage`` overwrites that field.  The
same holds inside ``usage.server_tool_use`` (server-side tools billed per request, e.g.
``{"web_search_requests": 3}``): a field present later overwrites the earlier value.
"""

from __future__ import annotations

import json

from marathon.protocol.messages import SERVER_TOOL_FIELDS, TOKEN_FIELDS, Usage

_FIELDS = TOKEN_FIELDS


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _read_usage(into: dict[str, int], usage) -> None:
    """Overwrite ``into`` with every field ``usage`` carries (tokens, and server tools)."""
    if not isinstance(usage, dict):
        return
    for k, v in usage.items():
        if k in _FIELDS and v is not None:
            into[k] = _int(v)
    tools = usage.get("server_tool_use")
    if isinstance(tools, dict):
        for k, v in tools.items():
            if k in SERVER_TOOL_FIELDS and v is not None:
                into[k] = _int(v)


class UsageMeter:
    """Feed it the raw bytes of an SSE response, chunk by chunk, in order."""

    def __init__(self) -> None:
        self._buf = b""
        self._usage: dict[str, int] = {}
        self.model: str | None = None
        self.tool_calls = 0
        self.stop_reason: str | None = None
        self.saw_start = False
        self.saw_stop = False
        self.error: str | None = None

    @property
    def usage(self) -> Usage:
        return Usage(**self._usage)

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        while True:
            i = self._buf.find(b"\n")
            if i < 0:
                if len(self._buf) > 4 * 1024 * 1024:  # a single line this long is not SSE we meter
                    self._buf = b""
                return
            line, self._buf = self._buf[:i].rstrip(b"\r"), self._buf[i + 1 :]
            if line.startswith(b"data:"):
                self._data(line[5:].strip())

    def _data(self, raw: bytes) -> None:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return
        if isinstance(obj, dict):
            self.event(obj)

    def event(self, obj: dict) -> None:
        kind = obj.get("type")
        if kind == "message_start":
            msg = obj.get("message") or {}
            self.saw_start = True
            self.model = msg.get("model") or self.model
            self._usage = {}
            _read_usage(self._usage, msg.get("usage"))
        elif kind == "message_delta":
            _read_usage(self._usage, obj.get("usage"))
            self.stop_reason = (obj.get("delta") or {}).get("stop_reason") or self.stop_reason
        elif kind == "content_block_start":
            if (obj.get("content_block") or {}).get("type") in ("tool_use", "server_tool_use"):
                self.tool_calls += 1
        elif kind == "message_stop":
            self.saw_stop = True
        elif kind == "error":
            self.error = str((obj.get("error") or {}).get("message") or obj)

    def message(self, obj: dict) -> None:
        """A non-streaming response body (a whole Message)."""
        if obj.get("type") == "error":
            self.error = str((obj.get("error") or {}).get("message") or obj)
            return
        self.model = obj.get("model") or self.model
        self._usage = {}
        _read_usage(self._usage, obj.get("usage"))
        self.tool_calls += sum(
            1
            for b in obj.get("content") or []
            if isinstance(b, dict) and b.get("type") in ("tool_use", "server_tool_use")
        )
        self.stop_reason = obj.get("stop_reason")
        self.saw_start = self.saw_stop = True
