"""Byte streams multiplexed over a framed channel, with credit-based flow control.

The agent accepts TCP connections inside the sandbox (Claude Code's API calls) and opens a
tunnel stream for each; the node receives the stream and serves it (the metering proxy).
Each side may have at most ``window`` unacknowledged bytes in flight per stream, so one
slow stream never blocks the channel or grows memory without bound.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import trio

from marathon.errors import ProtocolError
from marathon.protocol.messages import TunnelAck, TunnelClose, TunnelData, TunnelOpen

WINDOW = 256 * 1024
CHUNK = 64 * 1024


class TunnelStream(trio.abc.Stream):
    def __init__(self, mux: TunnelMux, conn: int):
        self._mux, self.conn = mux, conn
        self._buf = bytearray()
        self._data_ready = trio.Event()
        self._credit = mux.window
        self._credit_ready = trio.Event()
        self._peer_closed = False
        self._closed = False
        self.error: str | None = None

    # called by the mux (synchronously, from the channel's reader)
    def _feed(self, data: bytes) -> None:
        if len(self._buf) + len(data) > self._mux.window:
            raise ProtocolError(f"tunnel {self.conn}: peer exceeded the flow-control window")
        self._buf += data
        self._data_ready.set()

    def _ack(self, n: int) -> None:
        self._credit += n
        self._credit_ready.set()

    def _peer_close(self, error: str | None) -> None:
        self._peer_closed = True
        self.error = error
        self._data_ready.set()
        self._credit_ready.set()

    async def send_all(self, data) -> None:
        view = memoryview(data)
        while view:
            if self._closed:
                raise trio.ClosedResourceError("tunnel stream closed")
            if self._peer_closed:
                raise trio.BrokenResourceError(f"tunnel {self.conn} closed by peer")
            if self._credit <= 0:
                self._credit_ready = trio.Event()
                await self._credit_ready.wait()
                continue
            n = min(len(view), self._credit, CHUNK)
            self._credit -= n
            await self._mux._send(TunnelData(conn=self.conn, data=bytes(view[:n])))
            view = view[n:]

    async def wait_send_all_might_not_block(self) -> None:
        while self._credit <= 0 and not self._peer_closed:
            self._credit_ready = trio.Event()
            await self._credit_ready.wait()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._buf:
            if self._closed:
                raise trio.ClosedResourceError("tunnel stream closed")
            if self._peer_closed:
                return b""
            self._data_ready = trio.Event()
            await self._data_ready.wait()
        n = len(self._buf) if max_bytes is None else min(max_bytes, len(self._buf))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        if not self._peer_closed:
            try:
                await self._mux._send(TunnelAck(conn=self.conn, n=n))
            except Exception:
                pass
        return data

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._data_ready.set()
        self._credit_ready.set()
        self._mux._streams.pop(self.conn, None)
        if not self._peer_closed:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self._mux._send(TunnelClose(conn=self.conn))
                except Exception:
                    pass


class TunnelMux:
    """One per channel.  ``feed`` every tunnel message the reader gets; ``open`` new streams."""

    def __init__(
        self, send: Callable[[object], Awaitable[None]], *, window: int = WINDOW, first_id: int = 1, id_step: int = 2
    ):
        self._send = send
        self.window = window
        self._streams: dict[int, TunnelStream] = {}
        self._ids = itertools.count(first_id, id_step)

    async def open(self) -> TunnelStream:
        conn = next(self._ids)
        stream = TunnelStream(self, conn)
        self._streams[conn] = stream
        await self._send(TunnelOpen(conn=conn))
        return stream

    def feed(self, msg) -> TunnelStream | None:
        """Apply one tunnel message.  Returns a new stream when the peer opened one."""
        if isinstance(msg, TunnelOpen):
            if msg.conn in self._streams:
                raise ProtocolError(f"tunnel {msg.conn} opened twice")
            opened = self._streams[msg.conn] = TunnelStream(self, msg.conn)
            return opened
        stream = self._streams.get(msg.conn)
        if stream is None:
            return None  # a late message for a stream we already closed
        if isinstance(msg, TunnelData):
            stream._feed(msg.data)
        elif isinstance(msg, TunnelAck):
            stream._ack(msg.n)
        elif isinstance(msg, TunnelClose):
            self._streams.pop(msg.conn, None)
            stream._peer_close(msg.error)
        return None

    def close_all(self, error: str = "channel closed") -> None:
        for stream in list(self._streams.values()):
            stream._peer_close(error)
        self._streams.clear()


async def pipe(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    """Copy bytes both ways until either side closes; then close both."""

    async def one_way(src, dst, done):
        try:
            while data := await src.receive_some(CHUNK):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            done.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, a, b, nursery.cancel_scope)
        nursery.start_soon(one_way, b, a, nursery.cancel_scope)
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)
