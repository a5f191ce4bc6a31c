"""Files sent as ordered chunks over a framed channel (bundles in and out of sandboxes)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from marathon.errors import ProtocolError
from marathon.protocol.messages import BLOB_CHUNK, Blob


def chunks(path: str, size: int = BLOB_CHUNK) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, data, last) for the whole file; an empty file is one empty, last chunk."""
    offset = 0
    with open(path, "rb") as f:
        data = f.read(size)
        while True:
            nxt = f.read(size) if len(data) == size else b""
            last = not nxt
            yield offset, data, last
            if last:
                return
            offset += len(data)
            data = nxt


async def send_file(channel, name: str, path: str) -> None:
    """A file to the other end of a node <-> agent channel, as Blob chunks."""
    for offset, data, last in chunks(path):
        await channel.send(Blob(name=name, offset=offset, data=data, last=last))


class BlobWriter:
    """Reassembles a file from chunks; a chunk seen again (a resend) is ignored."""

    def __init__(self, path: str, limit: int = 4 * 1024**3):
        self.path = path
        self.size = 0
        self.done = False
        self.refused = ""
        self.limit = limit
        # never through a link someone planted at the name
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )

    def add(self, offset: int, data: bytes, last: bool) -> bool:
        """Returns True once the last chunk is in."""
        if self.refused:
            return False
        if self.done or offset < self.size:
            return self.done  # a duplicate
        if offset != self.size:
            raise ProtocolError(f"{os.path.basename(self.path)}: chunk at {offset}, expected {self.size}")
        if self.size + len(data) > self.limit:
            self.refused = f"larger than {self.limit} bytes"
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
            self.close()
            raise ProtocolError(f"{os.path.basename(self.path)}: {self.refused}")
        if self._fd is None:
            raise ProtocolError(f"{os.path.basename(self.path)}: already closed")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)
        self.done = last
        if last:
            self.close()
        return last

    def __del__(self) -> None:  # an abandoned transfer must not keep its descriptor
        self.close()

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            os.close(fd)
