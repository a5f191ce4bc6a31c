"""Artifacts a node uploads in chunks (result bundles), streamed to files on disk as they
arrive: one file per (node connection, task, attempt, name), never held in memory, only for
a task assigned to that node, checked against the size and SHA-256 its last chunk states,
and removed when the connection ends (the node sends it again from its first chunk)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from marathon.errors import ProtocolError
from marathon.protocol import messages as m
from marathon.protocol.blobs import BlobWriter

log = logging.getLogger("marathon.gateway")
UPLOADS_DIR = "uploads"


@dataclass
class Upload:
    writer: BlobWriter
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)


def uploads_root(data_dir: str) -> str:
    return os.path.join(data_dir, UPLOADS_DIR)


def clear_uploads(data_dir: str) -> None:
    """At start: what a previous run left half-received is of no use (nodes resend it)."""
    shutil.rmtree(uploads_root(data_dir), ignore_errors=True)


class SessionUploads:
    """The uploads of one node connection."""

    def __init__(self, data_dir: str, limit: int):
        self.data_dir, self.limit = data_dir, limit
        self.dir: str | None = None
        self.open: dict[tuple[str, int, str], Upload] = {}

    def _path(self, task_id: str, attempt: int, name: str) -> str:
        if self.dir is None:
            root = uploads_root(self.data_dir)
            os.makedirs(root, mode=0o700, exist_ok=True)
            self.dir = tempfile.mkdtemp(prefix="node-", dir=root)
        return os.path.join(self.dir, f"{task_id}.{attempt}.{name}")

    def start(self, msg: m.TaskBlob) -> None:
        """The first chunk (offset 0) of an upload the caller has checked is the node's to make."""
        key = (msg.task_id, msg.attempt, msg.name)
        self.drop(key)
        self.open[key] = Upload(BlobWriter(self._path(*key), limit=self.limit))

    def add(self, msg: m.TaskBlob) -> str | None:
        """Write a chunk.  Returns the complete file's path once the last chunk is in and the
        artifact is what the node said it is; None before that, or when the chunk is dropped."""
        key = (msg.task_id, msg.attempt, msg.name)
        up = self.open.get(key)
        if up is None:
            return None  # its first chunk was refused, or never came on this connection
        before = up.writer.size
        try:
            done = up.writer.add(msg.offset, msg.data, msg.last)
        except ProtocolError as exc:
            log.warning("task %s: %s upload dropped: %s", msg.task_id, msg.name, exc)
            self.drop(key)
            return None
        if up.writer.size > before:
            up.sha256.update(msg.data)
        if not done:
            return None
        self.open.pop(key)
        size, digest = up.writer.size, up.sha256.digest()
        if (msg.size >= 0 and msg.size != size) or (msg.sha256 and msg.sha256 != digest):
            log.warning(
                "task %s: %s upload dropped: %d bytes, sha256 %s; the node said %d bytes, sha256 %s",
                msg.task_id,
                msg.name,
                size,
                digest.hex()[:16],
                msg.size,
                msg.sha256.hex()[:16],
            )
            self._remove(up.writer.path)
            return None
        return up.writer.path

    def drop(self, key: tuple[str, int, str]) -> None:
        up = self.open.pop(key, None)
        if up is not None:
            up.writer.close()
            self._remove(up.writer.path)

    @staticmethod
    def _remove(path: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    def close(self) -> None:
        """The connection ended: whatever it left half-sent is deleted."""
        for up in self.open.values():
            up.writer.close()
        self.open.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def held_bytes(self) -> int:
        return sum(up.writer.size for up in self.open.values())
