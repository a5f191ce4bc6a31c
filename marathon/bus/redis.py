"""Redis bus: change notifications across replicas, via coredis pub/sub.

A notification only says "topic X changed, look again"; the store stays the source of
truth.  So nothing here has to be reliable, only prompt, and a lost notification can only
delay a follower:

- ``notify`` wakes this process's watchers at once and queues the topic for the publisher
  task, which publishes it on ``<prefix><topic>`` for the other replicas: a writer never
  waits for Redis.  Topics queued meanwhile coalesce (a set), so a slow or absent Redis
  costs bounded memory; what cannot be published is dropped (logged once per outage).
- one subscriber per process (``PSUBSCRIBE <prefix>*``, set up before ``open`` returns, so
  a watch armed after it cannot miss a publish) fans messages out to local watchers; when
  its connection drops it reconnects with backoff and then wakes every watcher, since a
  notification may have been missed meanwhile.
- ``Watch.wait`` also returns after ``poll_interval`` without any notification: the bound
  on how late a follower can be whatever happened to Redis.

arm → read the store → wait, as with the memory bus: a notify between the read and the
wait sets the armed event, so it is not lost.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

log = logging.getLogger("marathon.bus.redis")

REDIS_ERRORS = (RedisError, OSError, TimeoutError, trio.TooSlowError)


def redact_redis_url(url: str) -> str:
    import re

    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class RedisWatch:
    def __init__(self, bus: RedisBus, topic: str):
        self._bus, self._topic = bus, topic
        self._event: trio.Event | None = None

    def arm(self) -> None:
        self._event = self._bus._current(self._topic)

    async def wait(self) -> None:
        if self._event is None:
            self.arm()
        assert self._event is not None
        with trio.move_on_after(self._bus.poll_interval):
            await self._event.wait()


class RedisBus:
    def __init__(self, client: coredis.Redis, *, prefix: str, poll_interval: float, timeout: float):
        self._client = client
        self.prefix = prefix
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.instance = secrets.token_hex(8)  # our own publishes come back: skip them
        self._events: dict[str, trio.Event] = {}
        self._watchers: dict[str, int] = {}
        self.connected = False
        self.reconnects = 0  # subscriber (re)connections after the first
        self.closing = False  # set when open_redis_bus ends: errors of the teardown are not errors
        self.published = 0
        self.dropped = 0  # notifications not published because Redis was unreachable
        self._warned = False
        self._pending: dict[str, None] = {}  # topics to publish, in order, each once
        self._publish_now = trio.Event()

    MAX_PENDING = 100_000

    # ------------------------------------------------------------------ local fan-out

    def _current(self, topic: str) -> trio.Event:
        ev = self._events.get(topic)
        if ev is None:
            ev = self._events[topic] = trio.Event()
        return ev

    def _wake(self, topic: str) -> None:
        ev = self._events.pop(topic, None)
        if ev is not None:
            ev.set()

    def _wake_all(self) -> None:
        events, self._events = self._events, {}
        for ev in events.values():
            ev.set()

    # ------------------------------------------------------------------ Bus

    async def notify(self, topic: str) -> None:
        self._wake(topic)
        if len(self._pending) >= self.MAX_PENDING:  # Redis is far behind: they will poll
            self.dropped += len(self._pending)
            self._pending.clear()
        self._pending[topic] = None
        self._publish_now.set()
        await trio.lowlevel.checkpoint()

    async def serve_publisher(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._publish_now.wait()
            self._publish_now = trio.Event()
            topics, self._pending = list(self._pending), {}
            sent = 0
            try:
                for topic in topics:
                    with trio.fail_after(self.timeout):
                        await self._client.publish(self.prefix + topic, self.instance)
                    sent += 1
                    self.published += 1
                self._warned = False
            except REDIS_ERRORS as exc:
                self.dropped += len(topics) - sent
                if not self._warned:  # once per outage, not once per event
                    log.warning("bus: cannot publish to Redis (followers elsewhere poll meanwhile): %s", exc)
                    self._warned = True
                await trio.sleep(min(1.0, self.poll_interval / 5))

    @asynccontextmanager
    async def watch(self, topic: str) -> AsyncIterator[RedisWatch]:
        self._watchers[topic] = self._watchers.get(topic, 0) + 1
        try:
            yield RedisWatch(self, topic)
        finally:
            self._watchers[topic] -= 1
            if not self._watchers[topic]:
                del self._watchers[topic]
                self._events.pop(topic, None)

    async def close(self) -> None:
        pass  # the client and the subscriber belong to open_redis_bus

    # ------------------------------------------------------------------ subscriber

    async def serve_subscriber(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Receive notifications for ever; reconnect with backoff.  ``started`` once the
        first subscription is confirmed (or failed: the bus then polls until Redis is up)."""
        try:
            await self._subscribe(task_status)
        except BaseException:
            # being cancelled (the bus closes): coredis' pubsub cleanup may fail on its closing
            # connection (anyio.ClosedResourceError); that is the end we asked for, not an error
            if self.closing or trio.current_effective_deadline() == -math.inf:
                return
            raise

    async def _subscribe(self, task_status) -> None:
        backoff = 0.1
        started = False
        while True:
            try:
                async with self._client.pubsub(
                    patterns=[self.prefix + "*"],
                    ignore_subscribe_messages=True,
                    retry_policy=NoRetryPolicy(),
                    subscription_timeout=self.timeout,
                    max_idle_seconds=max(1.0, self.poll_interval),
                ) as ps:
                    if self.connected is False and (started or self.reconnects):
                        log.info("bus: subscribed to Redis again")
                    self.connected = True
                    backoff = 0.1
                    if started:
                        self.reconnects += 1
                        self._wake_all()  # anything may have changed while we were away
                    else:
                        started = True
                        task_status.started()
                    skip = self.instance.encode()
                    cut = len(self.prefix)
                    while True:
                        msg = await ps.get_message()
                        if msg is None or msg["type"] != "pmessage":
                            continue
                        if msg["data"] == skip:
                            continue
                        channel = msg["channel"]
                        topic = channel.decode() if isinstance(channel, bytes) else str(channel)
                        self._wake(topic[cut:])
            except REDIS_ERRORS + (ExceptionGroup,) as exc:
                if self.connected:
                    log.warning("bus: lost the Redis subscription (reconnecting; followers poll meanwhile): %s", exc)
                self.connected = False
                self._wake_all()
                if not started:
                    started = True
                    task_status.started()
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


@asynccontextmanager
async def open_redis_bus(
    url: str, *, prefix: str = "marathon:bus:", poll_interval: float = 5.0, timeout: float = 5.0
) -> AsyncIterator[RedisBus]:
    client = coredis.Redis.from_url(
        url, connect_timeout=timeout, stream_timeout=timeout, retry_policy=NoRetryPolicy(), client_name="marathon-bus"
    )
    async with client, trio.open_nursery() as nursery:
        bus = RedisBus(client, prefix=prefix, poll_interval=poll_interval, timeout=timeout)
        await nursery.start(bus.serve_publisher)
        await nursery.start(bus.serve_subscriber)
        if not bus.connected:
            log.warning("bus: Redis at %s is not reachable yet; polling until it is", redact_redis_url(url))
        try:
            yield bus
        finally:
            bus.closing = True
            nursery.cancel_scope.cancel()
