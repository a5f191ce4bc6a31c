"""Change notifications between orchestrator components (and replicas).

The store is the source of truth; the bus only says "topic X changed, look again".
A follower arms a watch, reads the store, then waits: a notify that lands between the
read and the wait is not lost, so followers never miss events and never see one twice.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol


class Watch(Protocol):
    def arm(self) -> None: ...

    async def wait(self) -> None: ...


class Bus(Protocol):
    async def notify(self, topic: str) -> None: ...

    def watch(self, topic: str) -> AbstractAsyncContextManager[Watch]: ...

    async def close(self) -> None: ...
