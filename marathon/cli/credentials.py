"""Where the CLI keeps its login per orchestrator URL: <config dir>/credentials.json, mode 0600."""

from __future__ import annotations

import json
import os
from pathlib import Path

from marathon.config import config_dir


def path() -> Path:
    return config_dir() / "credentials.json"


def _load_all() -> dict:
    try:
        return json.loads(path().read_text())
    except (OSError, ValueError):
        return {}


def load(url: str) -> dict | None:
    entry = _load_all().get(url.rstrip("/"))
    return entry if isinstance(entry, dict) and entry.get("token") else None


def save(url: str, token: str, **extra) -> Path:
    data = _load_all()
    data[url.rstrip("/")] = {"token": token, **extra}
    return _write(data)


def forget(url: str) -> None:
    data = _load_all()
    if data.pop(url.rstrip("/"), None) is not None:
        _write(data)


def _write(data: dict) -> Path:
    """Replace the file atomically; it is never readable by anyone else, not even briefly."""
    p = path()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, p)
    return p
