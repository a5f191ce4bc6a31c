"""Files sent as ordered chunks over a framed channel (bundles in and out of sandboxes, result
bundles to the orchestrator, a resumed task's bundle to its node): one chunker, one
reassembler, for every chunk message (``messages.Chunk``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import trio

from marathon.errors import ProtocolError
from marathon.protocol.messages import BLOB_CHUNK, Blob, Chunk


@dataclass(frozen=True)
class Piece:
    """What a chunk carries (its message adds where it goes)."""

    offset: int
    data: bytes
    last: bool
    size: int = -1  # on the last piece: the whole file's size and SHA-256
    sha256: bytes = b""

    def fields(self) -> dict:
        return {"offset": self.offset, "data": self.data, "last": self.last, "size": self.size, "sha256": self.sha256}


async def chunks(source: str | bytes | AsyncIterable[bytes], size: int = BLOB_CHUNK) -> AsyncIterator[Piece]:
    """The pieces of a file (a path, read without blocking the event loop), of bytes in memory,
    or of a stream of bytes (a stored artifact's parts): ``size`` bytes each, the last one
    marked and carrying the total and its SHA-256; an empty file is one empty, last piece
    (never a trailing empty piece otherwise)."""
    digest = hashlib.sha256()
    offset = 0
    if not isinstance(source, (str, bytes)):
        buf = bytearray()
        async for part in source:
            buf += part
            while len(buf) > size:  # keep a full piece back: the last one must be marked
                data = bytes(buf[:size])
                del buf[:size]
                digest.update(data)
                yield _piece(offset, data, False, digest)
                offset += len(data)
        digest.update(buf)
        yield _piece(offset, bytes(buf), True, digest)
        return
    if isinstance(source, bytes):
        view = memoryview(source)
        while True:
            data = bytes(view[offset : offset + size])
            digest.update(data)
            last = offset + len(data) >= len(source)
            yield _piece(offset, data, last, digest)
            if last:
                return
            offset += len(data)
    async with await trio.open_file(source, "rb") as f:
        data = await f.read(size)
        while True:
            nxt = await f.read(size) if len(data) == size else b""
            last = not nxt
            digest.update(data)
            yield _piece(offset, data, last, digest)
            if last:
                return
            offset += len(data)
            data = nxt


def _piece(offset: int, data: bytes, last: bool, digest) -> Piece:
    if last:
        return Piece(offset, data, True, offset + len(data), digest.digest())
    return Piece(offset, data, False)


async def send_file(channel, name: str, path: str) -> None:
    """A file to the other end of a node <-> agent channel, as Blob chunks."""
    async for p in chunks(path):
        await channel.send(Blob(name=name, **p.fields()))


class BlobWriter:
    """Reassembles a file from chunks, straight to disk; a chunk seen again (a resend) is
    ignored; the file is taken only when its size and SHA-256 are what the last chunk says."""

    def __init__(self, path: str, limit: int = 4 * 1024**3):
        self.path = path
        self.size = 0
        self.done = False
        self.refused = ""
        self.limit = limit
        self._sha256 = hashlib.sha256()
        # never through a link someone planted at the name
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )

    def add(self, chunk: Chunk) -> bool:
        """Returns True once the last chunk is in (and checks out); ProtocolError when it does
        not, or a chunk is missing, or the file grows past ``limit`` (then it is refused)."""
        if self.refused:
            return False
        if self.done or chunk.offset < self.size:
            return self.done  # a duplicate
        name = os.path.basename(self.path)
        if chunk.offset != self.size:
            raise ProtocolError(f"{name}: chunk at {chunk.offset}, expected {self.size}")
        if self.size + len(chunk.data) > self.limit:
            self._refuse(f"larger than {self.limit} bytes")
        if self._fd is None:
            raise ProtocolError(f"{name}: already closed")
        view = memoryview(chunk.data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(chunk.data)
        self._sha256.update(chunk.data)
        if not chunk.last:
            return False
        if chunk.size >= 0 and chunk.size != self.size:
            self._refuse(f"{self.size} bytes arrived, the sender said {chunk.size}")
        if chunk.sha256 and chunk.sha256 != self._sha256.digest():
            self._refuse("its SHA-256 is not the one the sender stated")
        self.done = True
        self.close()
        return True

    def _refuse(self, why: str) -> None:
        self.refused = why
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        self.close()
        raise ProtocolError(f"{os.path.basename(self.path)}: {why}")

    def __del__(self) -> None:  # an abandoned transfer must not keep its descriptor
        self.close()

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            os.close(fd)
