"""The agent role: inside the sandbox, take one task from the node, run Claude Code on the
workspace, stream events, return the outcome.  The node dials us (so a VM restored from a
snapshot is reachable again without the agent having to notice)."""

from __future__ import annotations

import logging
import os
import tempfile
import time

import msgspec
import trio

from marathon import __version__
from marathon.agent.task import Cancellation, execute
from marathon.config import Config
from marathon.logs import log_context
from marathon.errors import ConnectionClosed, ProtocolError, describe, leaves
from marathon.protocol.framing import FramedStream
from marathon.protocol.blobs import BlobWriter, send_file
from marathon.protocol import messages as m
from marathon.protocol.transports import listener_address, open_listeners
from marathon.protocol.tunnel import TunnelMux, pipe

log = logging.getLogger("marathon.agent")


def not_dumpable() -> None:
    """No core dumps, no ptrace, no /proc/<agent>/{mem,environ,fd} for processes of the same uid
    (Claude Code runs as our uid on nodes that are not root).  Reset for Claude Code by its exec."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError) as exc:
        log.warning("agent: cannot make itself non-dumpable: %s", exc)


async def serve_agent(config: Config, listen: str, *, once: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
    not_dumpable()
    listeners = await open_listeners(listen)
    listener = listeners[0]
    addr = listener_address(listener)
    log.info("agent listening on %s", addr)
    task_status.started(addr)
    async with listener:
        while True:
            stream = await listener.accept()
            ran = False
            try:
                ran = await handle_node(config, stream)
            except* (ProtocolError, ConnectionClosed, trio.TooSlowError) as group:
                log.warning("agent: node connection ended: %s", describe(group))
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
        reinject_identity(start)
        start = guest_task_disk(start)
        with log_context(task_id=start.task.task_id):
            await run_task(config, fs, start)
        return True
    except* ProtocolError as group:
        await fs.send_error(getattr(leaves(group)[0], "code", ProtocolError.code), describe(group))
        raise
    finally:
        await fs.aclose()


def private_dir(given: str) -> str:
    """Where the agent keeps its bundles: the node's choice (a root-owned directory on the task's
    disk), else a new one in /tmp (mkdtemp: never an existing, planted path).  Traversable but
    not writable by the sandbox user: its git reads the repository bundle there."""
    if given:
        os.makedirs(given, mode=0o711, exist_ok=True)
    else:
        given = tempfile.mkdtemp(prefix="marathon-agent-", dir="/tmp")
    os.chmod(given, 0o711)
    return given


GUEST_TASK_DISK = "/dev/vdb"
GUEST_TASK_ROOT = "/task"


def guest_task_disk(start: m.Start) -> m.Start:
    """In a VM guest with a task disk (the node attaches one of the task's disk size as the second
    virtio disk): mount it, put /workspace, HOME, TMPDIR and our own files on it, so the task's
    disk use is capped at its size.  Elsewhere, or without one, the Start is unchanged."""
    if not os.environ.get("MARATHON_GUEST") or os.geteuid() != 0 or not os.path.exists(GUEST_TASK_DISK):
        return start
    import subprocess

    def run(*argv: str) -> None:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise OSError(f"{' '.join(argv)}: {res.stderr.strip()[-200:]}")

    try:
        if not os.path.ismount(GUEST_TASK_ROOT):
            os.makedirs(GUEST_TASK_ROOT, mode=0o755, exist_ok=True)
            run("mount", "-o", "nosuid,nodev,noatime", GUEST_TASK_DISK, GUEST_TASK_ROOT)
        uid = start.run_uid or 4242
        for name, mode, owner in (
            ("workspace", 0o755, uid),
            ("home", 0o700, uid),
            ("tmp", 0o1777, 0),
            ("agent", 0o711, 0),
        ):
            path = os.path.join(GUEST_TASK_ROOT, name)
            os.makedirs(path, exist_ok=True)
            os.chown(path, owner, owner)
            os.chmod(path, mode)
        os.makedirs(start.workspace, mode=0o755, exist_ok=True)
        if not os.path.ismount(start.workspace):
            run("mount", "--bind", os.path.join(GUEST_TASK_ROOT, "workspace"), start.workspace)
    except OSError as exc:
        log.warning("agent: the task disk could not be used (%s); working on the guest's root disk", exc)
        return start
    return msgspec.structs.replace(
        start, home=start.home or f"{GUEST_TASK_ROOT}/home", tmp_dir=start.tmp_dir or f"{GUEST_TASK_ROOT}/tmp",
        private_dir=start.private_dir or f"{GUEST_TASK_ROOT}/agent",
    )  # fmt: skip


def reinject_identity(start: m.Start) -> None:
    """In a guest (a VM, perhaps restored from a snapshot): take the node's clock and mix
    fresh entropy into the RNG.  Elsewhere this does nothing."""
    if not os.environ.get("MARATHON_GUEST") or os.geteuid() != 0:
        return
    if start.now and abs(time.time() - start.now) > 1:
        try:
            time.clock_settime(time.CLOCK_REALTIME, start.now)
        except OSError as exc:
            log.warning("agent: cannot set the clock: %s", exc)
    if start.entropy:
        try:
            with open("/dev/urandom", "wb") as f:
                f.write(start.entropy)
        except OSError as exc:
            log.warning("agent: cannot seed the RNG: %s", exc)


async def run_task(config: Config, fs: FramedStream, start: m.Start) -> None:
    cancel = Cancellation()
    mux = TunnelMux(fs.send, first_id=1)
    private = private_dir(start.private_dir)
    bundle = os.path.join(private, "repo.bundle")
    result_bundle = os.path.join(private, "result.bundle")
    repo_ready = trio.Event()
    received = BlobWriter(bundle)

    async def read_node(scope: trio.CancelScope) -> None:
        try:
            while True:
                msg = await fs.receive()
                if isinstance(msg, (m.TunnelData, m.TunnelAck, m.TunnelClose, m.TunnelOpen)):
                    mux.feed(msg)
                elif isinstance(msg, m.Blob) and msg.name == "repo":
                    if received.add(msg):
                        repo_ready.set()
                elif isinstance(msg, m.CancelRun):
                    log.info("agent: cancel requested (%s)", msg.reason)
                    cancel.cancel(msg.reason)
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} during a task")
        except (ConnectionClosed, ProtocolError) as exc:
            log.warning("agent: lost the node (%s); stopping the task", exc)
            cancel.cancel("node_lost")
            mux.close_all()
            repo_ready.set()

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

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_node, nursery.cancel_scope)
        tunnel = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = tunnel.socket.getsockname()[1]
        await nursery.start(serve_tunnel, tunnel)
        with trio.move_on_after(config.connect_timeout * 10):
            await repo_ready.wait()
        if not received.done:
            outcome = m.TaskOutcome(
                state=m.State.FAILED, reason="sandbox_failed", message="the repository bundle did not arrive"
            )
        else:
            outcome = await execute(
                config, start, f"http://127.0.0.1:{port}{start.api_base_path}", emit, cancel, bundle, result_bundle
            )
        if outcome.has_bundle:
            await send_file(fs, "result", result_bundle)
        await fs.send(m.AgentResult(outcome=outcome))
        nursery.cancel_scope.cancel()
