"""Length-prefixed msgpack frames: 4-byte big-endian length, then the payload.

``FramedStream`` wraps any trio Stream (TCP, Unix socket, vsock, an in-memory pair)
and speaks one channel's message union.  Sends are serialised with a lock so many
tasks can share one connection; receives are done by one reader task.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Generic

import msgspec
import trio

from marathon.errors import ConnectionClosed, FrameTooLarge, ProtocolError, VersionMismatch
from marathon.protocol.messages import PROTOCOL_VERSION, Error, Hello

DEFAULT_MAX_FRAME = 8 * 1024 * 1024
CLOSE_TIMEOUT = 5.0
_HEADER = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()

if TYPE_CHECKING:  # a stream whose message type is not spelled out is a FramedStream[Any]
    from typing_extensions import TypeVar

    T = TypeVar("T", default=Any)
else:
    from typing import TypeVar

    T = TypeVar("T")


def encode_frame(msg: Any, *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    payload = _encoder.encode(msg)
    if len(payload) > max_frame:
        raise FrameTooLarge(f"outgoing frame of {len(payload)} bytes exceeds the {max_frame}-byte limit")
    return _HEADER.pack(len(payload)) + payload


def decode_frame(buf: bytes | bytearray, decoder: msgspec.msgpack.Decoder, *, max_frame: int = DEFAULT_MAX_FRAME):
    """Decode one frame from the start of ``buf``.

    Returns ``(message, bytes_consumed)`` or ``(None, 0)`` when ``buf`` holds only part of a frame.
    """
    if len(buf) < _HEADER.size:
        return None, 0
    (length,) = _HEADER.unpack_from(buf)
    if length > max_frame:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the {max_frame}-byte limit")
    end = _HEADER.size + length
    if len(buf) < end:
        return None, 0
    try:
        msg = decoder.decode(memoryview(buf)[_HEADER.size : end])
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed frame: {exc}") from None
    return msg, end


class FramedStream(Generic[T]):
    def __init__(
        self,
        stream: trio.abc.Stream,
        message_type: Any,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        send_timeout: float | None = None,
    ):
        self.stream = stream
        self.max_frame = max_frame
        self.send_timeout = send_timeout  # a peer that stops reading for this long: TooSlowError
        self._decoder = msgspec.msgpack.Decoder(message_type)
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        self._eof = False

    async def send(self, msg: Any) -> None:
        await self._write(encode_frame(msg, max_frame=self.max_frame))

    async def send_many(self, msgs) -> None:
        """Several messages in one write (one syscall instead of one per message)."""
        data = b"".join(encode_frame(msg, max_frame=self.max_frame) for msg in msgs)
        if data:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                if self.send_timeout is None:
                    await self.stream.send_all(data)
                else:
                    with trio.fail_after(self.send_timeout):
                        await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(f"peer closed the connection: {exc}") from None
            except trio.TooSlowError:
                # half a frame may be on the wire: this connection is unusable now
                await trio.aclose_forcefully(self.stream)
                raise ConnectionClosed(f"peer stopped reading for {self.send_timeout:.0f}s") from None

    async def receive(self) -> T:
        """Next message; raises ConnectionClosed at EOF, ProtocolError on bad input."""
        while True:
            msg, used = decode_frame(self._buf, self._decoder, max_frame=self.max_frame)
            if used:
                del self._buf[:used]
                return msg
            if self._eof:
                if self._buf:
                    raise ProtocolError(f"connection closed inside a frame ({len(self._buf)} bytes pending)")
                raise ConnectionClosed("peer closed the connection")
            try:
                chunk = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionClosed(f"connection lost: {exc}") from None
            if not chunk:
                self._eof = True
            else:
                self._buf += chunk

    def receive_buffered(self) -> T | None:
        """The next message if a whole frame is already buffered, else None (no I/O)."""
        msg, used = decode_frame(self._buf, self._decoder, max_frame=self.max_frame)
        if used:
            del self._buf[:used]
            return msg
        return None

    def __aiter__(self):
        return self

    async def __anext__(self) -> T:
        try:
            return await self.receive()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Close, also when cancelled; bounded, so a TLS close_notify to a peer that reads
        nothing cannot hold us (a cancelled ``aclose`` still closes the stream, forcefully)."""
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await self.stream.aclose()

    async def send_error(self, code: str, message: str) -> None:
        """Best effort: tell the peer why we are closing."""
        with trio.move_on_after(1):
            try:
                await self.send(Error(code=code, message=message))
            except Exception:
                pass

    async def handshake(self, role: str, version: str, *, initiator: bool, timeout: float) -> Hello:
        """Exchange Hello messages; the dialer speaks first.  Returns the peer's Hello."""
        hello = Hello(protocol=PROTOCOL_VERSION, role=role, version=version)
        with trio.fail_after(timeout):
            if initiator:
                await self.send(hello)
            peer = await self.receive()
            if isinstance(peer, Error):
                raise ProtocolError(f"peer refused the connection: {peer.code}: {peer.message}")
            if not isinstance(peer, Hello):
                raise ProtocolError(f"expected hello, got {type(peer).__name__}")
            if peer.protocol != PROTOCOL_VERSION:
                msg = f"protocol version mismatch: we speak {PROTOCOL_VERSION}, peer ({peer.role} {peer.version}) speaks {peer.protocol}"
                await self.send_error(VersionMismatch.code, msg)
                raise VersionMismatch(msg)
            if not initiator:
                await self.send(hello)
        return peer
