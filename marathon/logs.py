"""Logging for the daemons: JSON lines for machines, readable text for people.

``log_format = "auto"`` (the default) writes JSON lines when stderr is not a terminal (under
systemd, in a container, into the agent's log file) and text on a terminal; ``json`` and
``text`` force one.  Every record carries the ``task_id``, ``node_id`` and ``user`` of the
work it belongs to when they are known, from a context variable set with ``log_context``:

    with log_context(task_id=spec.task_id):
        ...   # every record logged here, and in trio tasks started from here, has task_id

No configured secret is ever written: the redaction runs over the finished line, so it
covers the message, its arguments, exception tracebacks and context fields alike, in both
formats.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

CONTEXT_FIELDS = ("task_id", "node_id", "user")
_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("marathon_log_context")
_EMPTY: dict[str, str] = {}  # never mutated: every change sets a new dict
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_state: dict[str, Any] = {"json": False, "redactor": None}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (None values are skipped) to every record logged inside the block.  trio
    tasks copy the context when they start, so tasks spawned inside inherit the fields."""
    new = {k: str(v) for k, v in fields.items() if v is not None and v != ""}
    token = _context.set({**_context.get(_EMPTY), **new})
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: Any) -> None:
    """Add fields for the rest of the current task (a request handler: each runs in a task of
    its own, with its own copy of the context)."""
    new = {k: str(v) for k, v in fields.items() if v is not None and v != ""}
    _context.set({**_context.get(_EMPTY), **new})


def current_context() -> dict[str, str]:
    return dict(_context.get(_EMPTY))


def json_enabled() -> bool:
    """Whether the daemon's log is JSON lines (then nothing else may be printed to stderr)."""
    return _state["json"]


def redact_also(*secrets: str | None) -> None:
    """Secrets learnt after start-up (a generated node secret): never logged from now on."""
    redactor = _state["redactor"]
    if redactor is not None:
        redactor.add(s for s in secrets if s)


class Redactor:
    """Replaces every configured secret (8 characters or more) with ``***``, raw or JSON-escaped."""

    def __init__(self, secrets: Iterable[str]):
        self.forms: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        forms = set(self.forms)
        for s in secrets:
            if s and len(s) >= 8:
                forms.add(s)
                forms.add(json.dumps(s)[1:-1])
        self.forms[:] = sorted(forms, key=len, reverse=True)  # in place: the filter shares the list

    def __call__(self, text: str) -> str:
        for s in self.forms:
            if s in text:
                text = text.replace(s, "***")
        return text


class _Redact(logging.Filter):
    """Last line of defence on the record itself: the message and its arguments, for any
    handler that formats them its own way (the formatters below also scrub the whole line)."""

    def __init__(self, secrets: Iterable[str] | Redactor):
        super().__init__()
        self.redact = secrets if isinstance(secrets, Redactor) else Redactor(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redact.forms:
            msg = record.getMessage()
            clean = self.redact(msg)
            if clean != msg:
                record.msg, record.args = clean, ()
        return True


class _ContextFilter(logging.Filter):
    """Copies the log context into the record (as attributes) when it is created."""

    def __init__(self, role: str = ""):
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in _context.get(_EMPTY).items():
            if not hasattr(record, k):
                setattr(record, k, v)
        if self.role and not hasattr(record, "role"):
            record.role = self.role
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, role, the context
    fields, any ``extra=`` fields, and ``exc`` (the traceback) when there is one."""

    def __init__(self, redact: Redactor | None = None):
        super().__init__()
        self.redact = redact or Redactor(())

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name}
        out["msg"] = record.getMessage()
        for k, v in _extras(record).items():
            out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return self.redact(json.dumps(out, ensure_ascii=False, default=str))


class TextFormatter(logging.Formatter):
    """``time role LEVEL logger: message [task=… node=… user=…]``."""

    def __init__(self, redact: Redactor | None = None):
        super().__init__("%(asctime)s %(role)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact or Redactor(())

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "role"):
            record.role = "-"
        line = super().format(record)
        ctx = [f"{k.replace('_id', '')}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None)]
        if ctx:
            head, sep, tail = line.partition("\n")  # keep a traceback below the line
            line = f"{head} [{' '.join(ctx)}]{sep}{tail}"
        return self.redact(line)


def wants_json(log_format: str, stream: TextIO) -> bool:
    if log_format == "json":
        return True
    if log_format == "text":
        return False
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def setup_logging(
    *,
    role: str,
    level: str = "info",
    log_format: str = "auto",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every record to ``stream`` (stderr) in the chosen format; returns the handler."""
    stream = stream if stream is not None else sys.stderr
    as_json = wants_json(log_format, stream)
    _state["json"] = as_json
    redact = _state["redactor"] = Redactor(secrets)
    lvl = getattr(logging, level.upper(), logging.INFO)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redact) if as_json else TextFormatter(redact))
    handler.addFilter(_ContextFilter(role))
    handler.addFilter(_Redact(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    for noisy in ("httpx", "httpcore", "hypercorn.access", "quart.serving"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    logging.captureWarnings(True)
    if as_json:  # an uncaught exception is a record too, not a bare traceback among JSON lines
        sys.excepthook = _log_uncaught
    return handler


def _log_uncaught(exc_type, exc, tb) -> None:
    interrupted = issubclass(exc_type, KeyboardInterrupt) or (
        isinstance(exc, BaseExceptionGroup) and exc.split(KeyboardInterrupt)[1] is None
    )
    if interrupted:
        logging.getLogger("marathon").info("interrupted")
        return
    logging.getLogger("marathon").critical("uncaught exception", exc_info=(exc_type, exc, tb))
