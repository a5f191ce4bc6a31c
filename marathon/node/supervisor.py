"""One task on one node: workspace, sandbox, agent channel, API tunnel, deadline, cancel.

Whatever happens, ``supervise`` returns an outcome (never raises for task failures) and
leaves nothing behind: the sandbox is destroyed and its directory removed, shielded.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from collections.abc import Awaitable, Callable

import msgspec
import trio

from marathon import __version__
from marathon.config import Config
from marathon.errors import (
    ConnectionClosed,
    MarathonError,
    ProtocolError,
    RepoError,
    SandboxError,
    VersionMismatch,
    describe,
    leaves,
)
from marathon.node.git import MirrorCache
from marathon.node.metrics import NodeMetrics
from marathon.node.pool import WarmPool
from marathon.node.repo import Prepared, prepare, publish
from marathon.node.proxy import MeteringProxy, ProxyGrant, RequestRecord
from marathon.node.limits import resolve as resolve_resources
from marathon.node.sandbox import Sandbox, SandboxBackend, SandboxOptions
from marathon.node.budget import Budget
from marathon.pricing import DEFAULT_FALLBACK
from marathon.units import format_size
from marathon.protocol.framing import FramedStream
from marathon.protocol.blobs import BlobWriter, send_file
from marathon.protocol import messages as m
from marathon.protocol.transports import open_stream
from marathon.protocol.tunnel import TunnelMux

log = logging.getLogger("marathon.node")
STOP_GRACE = 10.0  # how long the agent gets to stop Claude Code and report after a cancel


class TaskHandle:
    def __init__(self, spec: m.TaskSpec):
        self.spec = spec
        self.stop = trio.Event()
        self.stop_reason = ""
        self.usage = m.Usage()
        self.cost = 0.0
        self.budget_message = ""
        self.iteration = 0
        self.github_token: str | None = None
        self.resume_bundle: str | None = None  # path of the previous result bundle, when resuming
        self.after: TaskHandle | None = None  # an older attempt of the same task to wait for
        self.slot = 0  # which of the node's slots (and so which sandbox uid) the task runs in
        self.finished = trio.Event()
        self.scopes: set[trio.CancelScope] = set()

    def cancel(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()
            for scope in self.scopes:
                scope.cancel()


def _ended(handle: TaskHandle, t0: float, **kw) -> m.TaskOutcome:
    return m.TaskOutcome(duration_s=time.monotonic() - t0, usage=handle.usage, **kw)


async def connect_agent(sandbox: Sandbox, timeout: float, *, attempt_timeout: float = 3.0) -> FramedStream:
    """Dial the agent until it answers, the sandbox dies, or ``timeout`` passes.

    A connection is not an answer: QEMU's user networking and Firecracker's vsock accept the
    host side before anything listens in the guest.  Only the agent's Hello and Ready count."""
    delay = 0.005
    last: Exception | None = None
    with trio.move_on_after(timeout):
        while True:
            if sandbox.exited() is not None:
                raise SandboxError(
                    f"the sandbox exited ({sandbox.exited()}) before its agent was up: {sandbox.diagnostics()[-800:]}"
                )
            fs = None
            try:
                with trio.fail_after(attempt_timeout):
                    fs = FramedStream(await open_stream(sandbox.agent_address), m.AgentMessage)
                    await fs.handshake("node", __version__, initiator=True, timeout=attempt_timeout)
                    ready = await fs.receive()
                if not isinstance(ready, m.Ready):
                    raise SandboxError(f"expected ready from the agent, got {type(ready).__name__}")
                return fs
            except (VersionMismatch, SandboxError):
                raise
            except (OSError, ConnectionClosed, ProtocolError, trio.TooSlowError) as exc:
                last = exc
                if fs is not None:
                    await fs.aclose()
            await trio.sleep(delay)
            delay = min(delay * 2, 0.2)
    raise SandboxError(f"the agent did not come up within {timeout:.0f}s ({last}): {sandbox.diagnostics()[-800:]}")


async def supervise(
    handle: TaskHandle,
    config: Config,
    backend: SandboxBackend,
    proxy: MeteringProxy,
    emit: Callable[[m.Event], None],
    upload: Callable[[str, str], Awaitable[None]],
    cache: MirrorCache,
    pool: WarmPool | None = None,
    *,
    metrics: NodeMetrics | None = None,
) -> m.TaskOutcome:
    """``emit`` sends an event; ``upload(name, path)`` sends a file to the orchestrator."""
    spec = handle.spec
    t0 = time.monotonic()
    deadline = trio.current_time() + spec.timeout_s
    root = os.path.join(config.data_dir, "sandboxes", spec.task_id)
    run_dir = os.path.join(root, "run")
    result_bundle = os.path.join(root, "result.bundle")
    sandbox: Sandbox | None = None
    keep = False
    failed: m.TaskOutcome | None = None
    try:
        for d in (os.path.dirname(root), root):  # traversable by the sandbox user (plain fallback), not listable
            os.makedirs(d, mode=0o711, exist_ok=True)
            os.chmod(d, 0o711)
        res = resolve_resources(config, spec)
        for note in res.notes:
            emit(m.LogEvent(message=note, level="warning"))
        uid = config.sandbox_uid + handle.slot
        options = SandboxOptions(
            uid=uid, gid=uid, limits=res.limits, disk=res.disk, keep_workspace=spec.request.keep_workspace
        )
        started: dict = {}

        async def start_sandbox() -> None:
            """The sandbox comes up while the repository is prepared: neither waits for the other."""
            t_start = time.perf_counter()
            warm = pool.claim() if pool is not None else None
            if warm is not None:
                if metrics is not None:
                    claimed = time.perf_counter() - t_start
                    metrics.pool_claimed(claimed)
                    metrics.sandbox_started(backend.name, "warm", claimed)
                started["sandbox"], started["fs"] = warm.sandbox, warm.channel
                emit(m.LogEvent(message=f"sandbox: {backend.info.isolation}; warm, restored from a snapshot "
                                        f"{time.monotonic() - warm.ready_at:.1f}s ago"))  # fmt: skip
                return
            if pool is not None:
                why = pool.disabled or (
                    "the pool is empty" if not pool.failures else "restoring from the snapshot failed"
                )
                emit(m.LogEvent(message=f"warm pool: {why}; booting a sandbox cold"))
            with _stop_scope(handle):
                try:
                    started["sandbox"] = await backend.create(spec.task_id, run_dir, options)
                    emit(m.LogEvent(message=f"sandbox: {backend.info.isolation}"))
                    started["fs"] = await connect_agent(started["sandbox"], config.connect_timeout)
                except Exception:
                    if metrics is not None:
                        metrics.sandbox_failed(backend.name)
                    raise
                if metrics is not None and started.get("fs") is not None:  # not when stopped half-way
                    metrics.sandbox_started(backend.name, "cold", time.perf_counter() - t_start)

        async def prepare_repo() -> Prepared | m.TaskOutcome:
            emit(m.LogEvent(message=f"preparing the repository{f' {spec.request.repo}' if spec.request.repo else ''}"))
            try:
                prep = None
                t_repo = time.monotonic()
                with trio.move_on_at(deadline) as scope, _stop_scope(handle):
                    prep = await prepare(
                        spec, config, cache, root, token=handle.github_token, resume_bundle=handle.resume_bundle
                    )
                if scope.cancelled_caught:
                    return _ended(handle, t0, state=m.State.TIMED_OUT, reason="timeout",
                                  message="timed out preparing the repository")  # fmt: skip
                if prep is None or handle.stop.is_set():
                    return _ended(
                        handle, t0, state=m.State.CANCELLED, reason="cancelled", message="cancelled before start"
                    )
            except RepoError as exc:
                return _ended(handle, t0, state=m.State.FAILED, reason="repo_error", message=str(exc))
            if prep.ref is not None:
                how = "cache hit, fetched" if prep.cached else "cloned into the node's mirror cache"
                emit(m.LogEvent(
                    message=f"repository {prep.branch}@{prep.base[:10]} ({how}; {time.monotonic() - t_repo:.2f}s, "
                            f"bundle {os.path.getsize(prep.bundle) / 1e6:.1f} MB)"))  # fmt: skip
            return prep

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(start_sandbox)
                prepared = await prepare_repo()
                if isinstance(prepared, m.TaskOutcome):
                    nursery.cancel_scope.cancel()
        finally:
            sandbox = started.get("sandbox")
        if isinstance(prepared, m.TaskOutcome):
            if started.get("fs") is not None:
                await started["fs"].aclose()
            return prepared
        prep = prepared
        fs = started.get("fs")
        assert sandbox is not None
        if sandbox.group is not None:
            disk = f"; disk {format_size(res.disk)}" if res.disk and getattr(sandbox, "disk", None) else ""
            emit(m.LogEvent(message=f"limits: {sandbox.group.limits.describe()}{disk}"))
        if fs is None or handle.stop.is_set():
            if fs is not None:
                await fs.aclose()
            return _ended(handle, t0, state=m.State.CANCELLED, reason="cancelled", message="cancelled before start")
        watch = LimitWatch(sandbox.group, emit)
        try:
            outcome = await _drive(handle, fs, sandbox, proxy, emit, deadline, t0, prep, result_bundle,
                                   config.max_artifact, watch)  # fmt: skip
        except* SandboxError as group:
            watch.check()
            if not watch.oom_kills:
                raise
            outcome = _ended(handle, t0, state=m.State.FAILED, reason="memory_exhausted",
                             message=f"the agent was killed for exceeding the memory limit: {describe(group)}")  # fmt: skip
        outcome = watch.explain(outcome)
        if spec.request.keep_workspace and sandbox.host_workspace:
            keep = await _keep_workspace(sandbox.host_workspace, os.path.join(root, "workspace"))
        await sandbox.destroy()
        return await _hand_over(handle, outcome, prep, result_bundle, config, upload, emit)
    # every error the task met is handled; the first clause that matches says how the task ends
    except* (SandboxError, ProtocolError, ConnectionClosed) as group:
        log.warning("task %s: sandbox failed: %s", spec.task_id, describe(group))
        failed = failed or _ended(handle, t0, state=m.State.FAILED, reason="sandbox_failed", message=describe(group))
    except* MarathonError as group:
        code = getattr(leaves(group)[0], "code", "node_error")
        failed = failed or _ended(handle, t0, state=m.State.FAILED, reason=code, message=describe(group))
    except* Exception as group:  # a bug or a surprise fails this task, never the node
        log.error("task %s: node error", spec.task_id, exc_info=group)
        message = "; ".join(f"{type(e).__name__}: {e}" for e in leaves(group))
        failed = failed or _ended(handle, t0, state=m.State.FAILED, reason="node_error", message=message)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            if sandbox is not None:
                await sandbox.destroy()
            if not keep:
                await trio.to_thread.run_sync(lambda: shutil.rmtree(root, ignore_errors=True))
            else:
                log.info("task %s: workspace kept at %s", spec.task_id, os.path.join(root, "workspace"))
    assert failed is not None  # the try returns, or an except* clause said how the task failed
    return failed


async def _keep_workspace(src: str, dst: str) -> bool:
    """keep_workspace: the workspace copied off the task's disk before it is unmounted."""
    if os.path.realpath(src) == os.path.realpath(dst):
        return True
    res = await trio.run_process(["cp", "-a", "--reflink=auto", src, dst], capture_stderr=True, check=False)
    if res.returncode != 0:
        log.warning("keeping the workspace failed: %s", res.stderr.decode(errors="replace")[-300:])
    return res.returncode == 0


class LimitWatch:
    """Reads the sandbox's cgroup counters: says in the task's stream when the kernel killed a
    process for memory or refused a fork at the process limit, and explains a failure that
    came from it (``memory_exhausted``)."""

    POLL = 0.1

    def __init__(self, group, emit):
        self.group, self.emit = group, emit
        self.oom_kills = 0
        self.pids_hits = 0

    def check(self) -> None:
        if self.group is None:
            return
        oom, pids = self.group.oom_kills(), self.group.pids_limit_hits()
        if oom > self.oom_kills:
            limit = format_size(self.group.limits.memory) if self.group.limits.memory else "its limit"
            n = oom - self.oom_kills
            self.emit(m.LogEvent(level="warning", source="node", message=(
                f"out of memory: the kernel killed {n} process{'es' if n > 1 else ''} in the sandbox "
                f"(memory limit {limit})")))  # fmt: skip
            self.oom_kills = oom
        if pids > self.pids_hits:
            if not self.pids_hits:
                self.emit(m.LogEvent(level="warning", source="node", message=(
                    f"process limit reached: the sandbox may run at most {self.group.limits.pids} processes; "
                    "new ones are refused")))  # fmt: skip
            self.pids_hits = pids

    async def run(self) -> None:
        if self.group is None:
            return
        while True:
            self.check()
            await trio.sleep(self.POLL)

    def explain(self, outcome: m.TaskOutcome) -> m.TaskOutcome:
        self.check()
        if self.oom_kills and outcome.state == m.State.FAILED and outcome.reason in OOM_SUSPECTS:
            return msgspec.structs.replace(outcome, reason="memory_exhausted",
                                           message=f"out of memory (the sandbox's limit): {outcome.message or ''}".strip())  # fmt: skip
        return outcome


OOM_SUSPECTS = ("agent_error", "claude_error", "sandbox_failed", "git_error", "max_turns")


async def _hand_over(
    handle: TaskHandle, outcome: m.TaskOutcome, prep: Prepared, result_bundle: str, config: Config, upload, emit
) -> m.TaskOutcome:
    """The work is out of the sandbox: send the commits to the orchestrator, and push and
    open the pull request when asked (only for a task that succeeded)."""
    spec = handle.spec
    if outcome.has_bundle:
        await upload("bundle", result_bundle)
    if not spec.request.pr:
        return outcome
    if outcome.state != m.State.SUCCEEDED:
        return msgspec.structs.replace(
            outcome, pr_error=f"no pull request: the task ended {outcome.state} (its commits are kept)"
        )
    emit(m.LogEvent(message=f"pushing {spec.work_branch} and opening a pull request"))
    url, error = await publish(
        prep, spec, outcome, result_bundle, config, token=handle.github_token, usage=handle.usage, cost_usd=handle.cost
    )
    emit(
        m.LogEvent(
            message=f"pull request: {url}" if url else f"pull request failed: {error}",
            level="info" if url else "warning",
        )
    )
    return msgspec.structs.replace(outcome, pr_url=url, pr_error=error)


@contextmanager
def _stop_scope(handle: TaskHandle):
    """Cancel the body when the task is told to stop (used around slow set-up steps)."""
    with trio.CancelScope() as scope:
        handle.scopes.add(scope)
        if handle.stop.is_set():
            scope.cancel()
        try:
            yield scope
        finally:
            handle.scopes.discard(scope)


async def _drive(
    handle: TaskHandle,
    fs: FramedStream,
    sandbox: Sandbox,
    proxy: MeteringProxy,
    emit,
    deadline: float,
    t0: float,
    prep: Prepared,
    result_bundle: str,
    max_artifact: int,
    watch: LimitWatch,
) -> m.TaskOutcome:
    spec = handle.spec
    result = BlobWriter(result_bundle, limit=max_artifact)

    # reserve-before-forward, settle-after: the rule and its bound are in marathon/node/budget.py
    budget = Budget(spec.request.max_tokens, spec.request.max_cost, prices=spec.prices,
                    fallback=spec.price_fallback or DEFAULT_FALLBACK)  # fmt: skip

    def on_record(rec: RequestRecord) -> None:
        """Called once a request has settled: its usage is in the budget already."""
        handle.usage, handle.cost = budget.usage, budget.cost
        emit(
            m.ApiRequestEvent(
                iteration=handle.iteration,
                model=rec.model or "",
                status=rec.status,
                usage=rec.usage,
                tool_calls=rec.tool_calls,
                request_bytes=rec.request_bytes,
                response_bytes=rec.response_bytes,
                duration_s=rec.duration_s,
                ttft_s=rec.ttft_s,
                complete=rec.complete,
                error=rec.error,
            )
        )
        reason = budget.exhausted()
        if reason and not handle.stop.is_set():
            log.info("task %s: %s; stopping it", spec.task_id, reason)
            handle.budget_message = reason
            handle.cancel("budget_exhausted")

    grant = ProxyGrant(
        task_id=spec.task_id,
        token="mt_" + secrets.token_urlsafe(32),
        on_record=on_record,
        budget=budget,
        expires_at=time.time() + (deadline - trio.current_time()) + STOP_GRACE,
    )
    mux = TunnelMux(fs.send, first_id=2)

    async def stopper() -> None:
        with trio.move_on_at(deadline):
            await handle.stop.wait()
        handle.cancel(handle.stop_reason or "timeout")
        t_stop = trio.current_time()
        with trio.move_on_after(STOP_GRACE):  # a wedged agent may not read: never wait on it forever
            try:
                await fs.send(m.CancelRun(reason=handle.stop_reason))
            except ConnectionClosed:
                pass
        await trio.sleep_until(t_stop + STOP_GRACE)
        log.warning("task %s: the agent did not stop within %.0fs; killing the sandbox", spec.task_id, STOP_GRACE)
        await sandbox.destroy()

    async def pump(nursery: trio.Nursery) -> m.TaskOutcome | None:
        try:
            while True:
                msg = await fs.receive()
                if isinstance(msg, m.AgentEvent):
                    ev = msg.event
                    if isinstance(ev, m.IterationEvent):
                        handle.iteration = ev.iteration
                    if isinstance(ev, m.ApiRequestEvent) or (
                        isinstance(ev, m.StateEvent) and ev.state != m.State.RUNNING
                    ):
                        continue  # metering is the proxy's and states the orchestrator's: not the sandbox's to say
                    emit(ev)
                elif isinstance(msg, m.Blob) and msg.name == "result":
                    try:
                        result.add(msg)
                    except ProtocolError as exc:  # too large, or out of order: the task goes on without it
                        log.warning("task %s: result bundle refused: %s", spec.task_id, exc)
                        result.refused = result.refused or str(exc)
                elif isinstance(msg, (m.TunnelOpen, m.TunnelData, m.TunnelAck, m.TunnelClose)):
                    stream = mux.feed(msg)
                    if stream is not None:
                        nursery.start_soon(proxy.handle, stream, grant)
                elif isinstance(msg, m.AgentResult):
                    out = msg.outcome
                    if out.state not in m.TERMINAL_OUTCOMES:
                        out = msgspec.structs.replace(
                            out,
                            state=m.State.FAILED,
                            reason="agent_error",
                            message=f"the agent reported state {out.state[:40]!r}",
                        )
                    return out
                elif isinstance(msg, m.Error):
                    raise ProtocolError(f"agent says {msg.code}: {msg.message}")
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} from the agent")
        except ConnectionClosed as exc:
            if not handle.stop.is_set():
                raise SandboxError(f"lost the agent: {exc}; {sandbox.diagnostics()[-500:]}") from None
            return None
        finally:
            mux.close_all()
            nursery.cancel_scope.cancel()

    try:
        await fs.send(
            m.Start(
                task=spec,
                workspace=sandbox.workspace,
                base_branch=prep.branch,
                api_key=grant.token,
                now=time.time(),
                entropy=secrets.token_bytes(64),
                **sandbox.start_fields,
            )
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stopper)
            nursery.start_soon(watch.run)
            nursery.start_soon(send_file, fs, "repo", prep.bundle)
            outcome = await pump(nursery)
    finally:
        await fs.aclose()
    if outcome is not None and outcome.has_bundle and not result.done:
        why = result.refused or "incomplete"
        outcome = msgspec.structs.replace(
            outcome, has_bundle=False, message=f"{outcome.message or ''} (result bundle {why})".strip()
        )
    if handle.stop.is_set():
        reason = handle.stop_reason or "timeout"
        message = handle.budget_message or f"stopped: {reason}"
        if outcome is None:  # the agent never reported
            return _ended(handle, t0, state=m.stopped_state(reason), reason=reason, message=message)
        outcome = msgspec.structs.replace(outcome, state=m.stopped_state(reason), reason=reason, message=message)
    if outcome is None:  # cannot happen: pump returns None only once the task was told to stop
        return _ended(
            handle, t0, state=m.State.FAILED, reason="sandbox_failed", message="the agent ended without a result"
        )
    return outcome
