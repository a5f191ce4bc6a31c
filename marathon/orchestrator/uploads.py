"""Artifacts a node uploads in chunks (result bundles), streamed to files on disk as they
arrive: one file per (node connection, task, attempt, name), never held in memory, only for
a task assigned to that node, checked against the size and SHA-256 its last chunk states,
and removed when the connection ends (the node sends it again from its first chunk)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile

from marathon.errors import ProtocolError
from marathon.protocol import messages as m
from marathon.protocol.blobs import BlobWriter

log = logging.getLogger("marathon.gateway")
UPLOADS_DIR = "uploads"


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
        self.open: dict[tuple[str, int, str], BlobWriter] = {}

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
        self.open[key] = BlobWriter(self._path(*key), limit=self.limit)

    def add(self, msg: m.TaskBlob) -> str | None:
        """Write a chunk.  Returns the complete file's path once the last chunk is in and the
        artifact is what the node said it is; None before that, or when the chunk is dropped."""
        key = (msg.task_id, msg.attempt, msg.name)
        writer = self.open.get(key)
        if writer is None:
            return None  # its first chunk was refused, or never came on this connection
        try:
            done = writer.add(msg)
        except ProtocolError as exc:  # a gap, too large, or not the size and SHA-256 stated
            log.warning("task %s: %s upload dropped: %s", msg.task_id, msg.name, exc)
            self.drop(key)
            return None
        if not done:
            return None
        self.open.pop(key)
        return writer.path

    def drop(self, key: tuple[str, int, str]) -> None:
        writer = self.open.pop(key, None)
        if writer is not None:
            writer.close()
            self._remove(writer.path)

    @staticmethod
    def _remove(path: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    def close(self) -> None:
        """The connection ended: whatever it left half-sent is deleted."""
        for writer in self.open.values():
            writer.close()
        self.open.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def held_bytes(self) -> int:
        return sum(writer.size for writer in self.open.values())
