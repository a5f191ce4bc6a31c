"""The warm pool: sandboxes restored from a snapshot taken after the agent came up, kept
ready so a task starts without booting.

Pure core (``refill_plan``) + async shell.  Claiming takes a sandbox out of the pool and the
pool refills in the background; the pool never holds more than the node's free slots.  When
restoring fails the task boots cold (and says so); the pool retries with backoff.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from collections.abc import Callable

import trio

from marathon.errors import MarathonError
from marathon.node.sandbox import Sandbox
from marathon.protocol.framing import FramedStream

log = logging.getLogger("marathon.pool")
CLEANUP_TIMEOUT = 60.0  # destroying what the pool holds when it stops


def refill_plan(*, target: int, slots: int, active: int, ready: int, filling: int) -> int:
    """How many more sandboxes to start restoring now."""
    want = min(target, max(0, slots - active))
    return max(0, want - ready - filling)


@dataclass
class Warm:
    sandbox: Sandbox
    channel: FramedStream  # the agent's channel, already past Hello/Ready
    ready_at: float


class WarmPool:
    def __init__(
        self,
        backend,
        *,
        target: int,
        slots: int,
        active: Callable[[], int],
        root: str,
        connect: Callable,
        connect_timeout: float,
    ):
        self.backend, self.target, self.slots, self.active = backend, target, slots, active
        self.root, self._connect, self.connect_timeout = root, connect, connect_timeout
        self.ready: collections.deque[Warm] = collections.deque()
        self.filling = 0
        self.hits = self.misses = self.failures = 0
        self.claim_ms: collections.deque[float] = collections.deque(maxlen=200)
        self.snapshot = None
        self.disabled: str | None = None
        self._changed = trio.Event()
        self._news = trio.Event()
        self._seq = 0

    def poke(self) -> None:
        self._changed.set()  # the refill loop's (it makes a new one each round)
        self._news.set()  # waiters' (wait_ready)
        self._news = trio.Event()

    async def wait_ready(self, n: int) -> None:
        """Until ``n`` sandboxes are ready (or the pool is disabled: MarathonError)."""
        while len(self.ready) < n:
            if self.disabled:
                raise MarathonError(f"the warm pool is disabled: {self.disabled}")
            await self._news.wait()

    def stats(self) -> dict:
        return {
            "warm": len(self.ready),
            "hits": self.hits,
            "misses": self.misses,
            "failures": self.failures,
            "claim_ms_p50": round(statistics.median(self.claim_ms), 2) if self.claim_ms else None,
            "disabled": self.disabled,
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        try:
            await self._make_snapshot()
        except (MarathonError, OSError, trio.TooSlowError) as exc:
            self.disabled = f"could not take the base snapshot: {exc}"
            log.warning("warm pool disabled: %s", self.disabled)
            self.poke()
            return
        backoff = 0.5
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    self._changed = trio.Event()
                    n = refill_plan(
                        target=self.target,
                        slots=self.slots,
                        active=self.active(),
                        ready=len(self.ready),
                        filling=self.filling,
                    )
                    for _ in range(n):
                        self.filling += 1
                        nursery.start_soon(self._fill)
                    if self.failures and n:
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, 30)
                    else:
                        backoff = 0.5
                    await self._changed.wait()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT) as scope:
                    while self.ready:
                        await self.ready.popleft().sandbox.destroy()
                    await trio.to_thread.run_sync(lambda: shutil.rmtree(self.root, ignore_errors=True))
                if scope.cancelled_caught:
                    log.warning(
                        "warm pool: cleanup took over %.0fs; the rest is left to the next start", CLEANUP_TIMEOUT
                    )

    async def _make_snapshot(self, attempts: int = 3) -> None:
        """Boot the base VM and snapshot it once its agent answers.  An emulated boot now and
        then hangs early (seen under TCG: the vCPUs spin, the agent never comes up), so a boot
        that does not answer in time is thrown away and tried again."""
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            base_dir = os.path.join(self.root, f"base-vm-{attempt}")
            sb = await self.backend.create("pool-base", base_dir)
            try:
                fs = await self._connect(sb, self.connect_timeout / attempts)
                await fs.aclose()  # the agent goes back to listening; that is the state we keep
                self.snapshot = await self.backend.snapshot(sb, os.path.join(self.root, "snapshot"))
                break
            except (MarathonError, trio.TooSlowError) as exc:
                if attempt == attempts:
                    raise
                log.warning("warm pool: base VM boot %d failed (%s); booting again", attempt, exc)
            finally:
                await sb.destroy()
        log.info("warm pool: base snapshot taken in %.1fs", time.monotonic() - t0)

    async def _fill(self) -> None:
        self._seq += 1
        name = f"warm-{self._seq}"
        sb = None
        kept = False
        try:
            sb = await self.backend.restore(name, os.path.join(self.root, name), self.snapshot)
            fs = await self._connect(sb, self.connect_timeout)
            self.ready.append(Warm(sb, fs, time.monotonic()))
            kept = True
            self.failures = 0
        except (MarathonError, OSError, trio.TooSlowError) as exc:
            self.failures += 1
            log.warning("warm pool: restore failed: %s", exc)
        finally:
            if sb is not None and not kept:
                await sb.destroy()  # shielded: also when we are cancelled half-way
            self.filling -= 1
            self.poke()

    def claim(self) -> Warm | None:
        """A ready sandbox, or None (a miss: the caller boots cold)."""
        t0 = time.perf_counter()
        while self.ready:
            warm = self.ready.popleft()
            if warm.sandbox.exited() is None:
                self.hits += 1
                self.claim_ms.append((time.perf_counter() - t0) * 1000)
                self.poke()
                return warm
            self.failures += 1
        self.misses += 1
        self.poke()
        return None
