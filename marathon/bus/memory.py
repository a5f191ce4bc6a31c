"""In-process bus for the embedded mode."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio


class MemoryWatch:
    def __init__(self, bus: MemoryBus, topic: str):
        self._bus, self._topic = bus, topic
        self._event: trio.Event | None = None

    def arm(self) -> None:
        self._event = self._bus._current(self._topic)

    async def wait(self) -> None:
        if self._event is None:
            self.arm()
        assert self._event is not None
        await self._event.wait()


class MemoryBus:
    def __init__(self) -> None:
        self._events: dict[str, trio.Event] = {}
        self._watchers: dict[str, int] = {}

    def _current(self, topic: str) -> trio.Event:
        ev = self._events.get(topic)
        if ev is None:
            ev = self._events[topic] = trio.Event()
        return ev

    async def notify(self, topic: str) -> None:
        ev = self._events.pop(topic, None)
        if ev is not None:
            ev.set()

    @asynccontextmanager
    async def watch(self, topic: str):
        self._watchers[topic] = self._watchers.get(topic, 0) + 1
        try:
            yield MemoryWatch(self, topic)
        finally:
            self._watchers[topic] -= 1
            if not self._watchers[topic]:
                del self._watchers[topic]
                self._events.pop(topic, None)

    async def close(self) -> None:
        pass
