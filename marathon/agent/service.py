"""The agent role: inside the sandbox, take one task from the node, run Claude Code on the
workspace, stream events, return the outcome.  The node dials us (so a VM restored from a
snapshot is reachable again without the agent having to notice)."""

from __future__ import annotations

import logging
import os
import time

import trio

from marathon import __version__
from marathon.agent.runner import find_claude, make_run_user, run_claude, run_git, workspace_diff
from marathon.config import Config
from marathon.errors import ConnectionClosed, MarathonError, ProtocolError, single_errors
from marathon.protocol import FramedStream
from marathon.protocol import messages as m
from marathon.protocol.transports import listener_address, open_listeners
from marathon.protocol.tunnel import TunnelMux, pipe

log = logging.getLogger("marathon.agent")


class Cancellation:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.reason = ""

    def cancel(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


async def serve_agent(config: Config, listen: str, *, once: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
    listeners = await open_listeners(listen)
    listener = listeners[0]
    addr = listener_address(listener)
    log.info("agent listening on %s", addr)
    task_status.started(addr)
    async with listener:
        while True:
            stream = await listener.accept()
            try:
                ran = await handle_node(config, stream)
            except (ProtocolError, ConnectionClosed, trio.TooSlowError) as exc:
                log.warning("agent: node connection ended: %s", exc)
                ran = False
            if ran and once:
                return


async def handle_node(config: Config, stream: trio.abc.Stream) -> bool:
    """Serve one node connection; True once a task has run on it."""
    fs = FramedStream(stream, m.AgentMessage)
    try:
        await fs.handshake("agent", __version__, initiator=False, timeout=config.connect_timeout)
        await fs.send(m.Ready(agent_version=__version__, sandbox=os.environ.get("MARATHON_ISOLATION", "")))
        start = await fs.receive()
        if not isinstance(start, m.Start):
            raise ProtocolError(f"expected start, got {type(start).__name__}")
        await run_task(config, fs, start)
        return True
    except ProtocolError as exc:
        await fs.send_error(exc.code, str(exc))
        raise
    finally:
        await fs.aclose()


async def run_task(config: Config, fs: FramedStream, start: m.Start) -> None:
    cancel = Cancellation()
    mux = TunnelMux(fs.send, first_id=1)

    async def read_node(scope: trio.CancelScope) -> None:
        try:
            while True:
                msg = await fs.receive()
                if isinstance(msg, (m.TunnelData, m.TunnelAck, m.TunnelClose, m.TunnelOpen)):
                    mux.feed(msg)
                elif isinstance(msg, m.CancelRun):
                    log.info("agent: cancel requested (%s)", msg.reason)
                    cancel.cancel(msg.reason)
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} during a task")
        except (ConnectionClosed, ProtocolError) as exc:
            log.warning("agent: lost the node (%s); stopping the task", exc)
            cancel.cancel("node_lost")
            mux.close_all()

    async def serve_tunnel(listener: trio.SocketListener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async def one(client: trio.SocketStream) -> None:
            try:
                remote = await mux.open()
            except ConnectionClosed:
                await client.aclose()
                return
            await pipe(client, remote)

        task_status.started()
        await trio.serve_listeners(one, [listener])

    async def emit(events: list[m.Event]) -> None:
        await fs.send_many([m.AgentEvent(event=ev) for ev in events])

    with single_errors():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_node, nursery.cancel_scope)
            tunnel = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            port = tunnel.socket.getsockname()[1]
            await nursery.start(serve_tunnel, tunnel)
            outcome = await execute(config, start, f"http://127.0.0.1:{port}{start.api_base_path}", emit, cancel)
            await fs.send(m.AgentResult(outcome=outcome))
            nursery.cancel_scope.cancel()


async def execute(config: Config, start: m.Start, api_url: str, emit, cancel: Cancellation) -> m.TaskOutcome:
    """Run the task on the workspace; never raises for task-level failures."""
    task = start.task
    t0 = time.monotonic()
    workspace = start.workspace
    try:
        claude = find_claude(config.claude_bin)
        user = make_run_user(config.sandbox_uid, "/tmp")
        base = (await run_git(user, workspace, "rev-parse", "HEAD")).strip()
    except MarathonError as exc:
        return m.TaskOutcome(state="failed", reason="sandbox_failed", message=str(exc), duration_s=time.monotonic() - t0)

    await emit([m.StateEvent(state="running")])
    run = await run_claude(
        claude=claude, prompt=task.prompt, workspace=workspace, user=user, api_url=api_url,
        api_key=start.api_key, model=task.model, max_turns=task.max_turns, emit=emit, cancel=cancel.event,
    )
    try:
        diff, stat = await workspace_diff(user, workspace, base)
    except MarathonError as exc:
        diff, stat = "", f"(diff unavailable: {exc})"
    res = run.parser.result
    common = dict(
        exit_code=run.exit_code,
        is_error=res.is_error if res else True,
        num_turns=res.num_turns if res else 0,
        usage=res.usage if res else m.Usage(),
        claude_usage=res.usage if res else None,
        cost_usd=res.total_cost_usd if res else None,
        duration_s=time.monotonic() - t0,
        diff=diff, diff_stat=stat,
        final_text=(res.result if res else run.parser.last_text)[-4000:],
    )
    if cancel.event.is_set():
        reason = cancel.reason or "cancelled"
        return m.TaskOutcome(state=m.stopped_state(reason), reason=reason, message=f"stopped: {reason}", **common)
    if res is None:
        return m.TaskOutcome(state="failed", reason="agent_error",
                             message=f"Claude Code exited with {run.exit_code} without a result: {run.stderr_tail[-500:]}", **common)
    if res.subtype == "error_max_turns":
        return m.TaskOutcome(state="failed", reason="max_turns", message=f"reached --max-turns {task.max_turns}", **common)
    if res.is_error or run.exit_code != 0:
        return m.TaskOutcome(state="failed", reason="claude_error", message=(res.result or run.stderr_tail)[-500:], **common)
    return m.TaskOutcome(state="succeeded", **common)
