"""Large artifacts (result bundles, up to ``max_artifact``) in parts, so none is ever held whole
in memory: a file goes into the store part by part, and comes out part by part (to a node with
its assignment, to a client of ``GET /v1/tasks/{id}/bundle``).

Spelled once for every store, on its ``put_artifact``/``get_artifact``: the parts are rows
``<name>.000000``, ``<name>.000001``… and the row ``<name>`` is written last, a small manifest
(parts, size, SHA-256) — so a reader never sees a half-written artifact: until the manifest is
there, the previous one (if any) is what it reads.  A row ``<name>`` that is not a manifest is
an artifact stored whole (small ones, and what older versions wrote); it reads as one part.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import msgspec
import trio

from marathon.errors import StoreError

PART = 4 * 1024 * 1024
MAGIC = b"marathon-parts:1\n"


class Manifest(msgspec.Struct, frozen=True):
    parts: int
    size: int
    sha256: str


def _part(name: str, i: int) -> str:
    return f"{name}.{i:06d}"


async def put_file(store, task_id: str, name: str, path: str, *, part: int = PART) -> Manifest:
    """Store the file at ``path`` as artifact ``name``, ``part`` bytes in memory at a time."""
    digest, size, n = hashlib.sha256(), 0, 0
    async with await trio.open_file(path, "rb") as f:
        while data := await f.read(part):
            await store.put_artifact(task_id, _part(name, n), data)
            digest.update(data)
            size, n = size + len(data), n + 1
    manifest = Manifest(n, size, digest.hexdigest())
    await store.put_artifact(task_id, name, MAGIC + msgspec.json.encode(manifest))
    return manifest


async def manifest(store, task_id: str, name: str) -> Manifest | bytes | None:
    """The manifest of a parted artifact, the bytes of one stored whole, or None."""
    head = await store.get_artifact(task_id, name)
    if head is None or not head.startswith(MAGIC):
        return head
    try:
        return msgspec.json.decode(head[len(MAGIC) :], type=Manifest)
    except msgspec.DecodeError as exc:
        raise StoreError(f"task {task_id}: artifact {name} has a bad manifest: {exc}") from None


def size_of(found: Manifest | bytes) -> int:
    return found.size if isinstance(found, Manifest) else len(found)


async def read_parts(store, task_id: str, name: str, found: Manifest | bytes) -> AsyncIterator[bytes]:
    """The artifact's bytes, a part at a time (what ``manifest`` found)."""
    if isinstance(found, bytes):
        yield found
        return
    for i in range(found.parts):
        data = await store.get_artifact(task_id, _part(name, i))
        if data is None:
            raise StoreError(f"task {task_id}: part {i} of artifact {name} is missing")
        yield data
