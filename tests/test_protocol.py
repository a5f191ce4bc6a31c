import msgspec
import pytest
import trio
import trio.testing

from marathon.errors import ConnectionClosed, FrameTooLarge, ProtocolError, VersionMismatch
from marathon.protocol.framing import FramedStream, decode_frame, encode_frame
from marathon.protocol import messages as m
from marathon.protocol.transports import parse_address
from marathon.protocol.tunnel import TunnelMux
import trio.lowlevel

GW = msgspec.msgpack.Decoder(m.GatewayMessage)


def sample_messages():
    spec = m.TaskSpec(
        task_id="t1",
        request=m.TaskRequest(prompt="do it", repo="/r"),
        max_turns=3,
        prices={"claude-*": m.Price(input=3.0, output=15.0)},
    )
    return [
        m.Hello(protocol=m.PROTOCOL_VERSION, role="node", version="x"),
        m.Challenge(nonce=b"\x00" * 32),
        m.Authenticate(node_id="n", name="n", mac=b"m", capacity=m.Capacity(slots=2), running={"t1": 2}, nonce=b"x"),
        m.Assign(task=spec),
        m.TaskEvent(task_id="t1", node_seq=7, event=m.ToolCallEvent(tool_id="1", name="Bash", summary="ls")),
        m.TaskResult(task_id="t1", node_seq=8, outcome=m.TaskOutcome(state="succeeded", usage=m.Usage(1, 2, 3, 4))),
        m.HeartbeatAck(acked=8),
    ]


@pytest.mark.parametrize("msg", sample_messages(), ids=lambda x: type(x).__name__)
def test_round_trip(msg):
    frame = encode_frame(msg)
    out, used = decode_frame(frame, GW)
    assert used == len(frame)
    assert out == msg


def test_truncated_frames_wait_for_more():
    frame = encode_frame(m.Heartbeat(capacity=m.Capacity(slots=1)))
    for cut in range(len(frame)):
        assert decode_frame(frame[:cut], GW) == (None, 0)


def test_two_frames_in_one_buffer():
    a, b = encode_frame(m.Drain()), encode_frame(m.Cancel(task_id="x"))
    msg, used = decode_frame(a + b, GW)
    assert msg == m.Drain() and used == len(a)
    assert decode_frame((a + b)[used:], GW)[0] == m.Cancel(task_id="x")


def test_oversized_frame_rejected_from_header_alone():
    header = (10_000_000).to_bytes(4, "big")
    with pytest.raises(FrameTooLarge):
        decode_frame(header, GW, max_frame=1_000_000)
    with pytest.raises(FrameTooLarge):
        encode_frame(m.Challenge(nonce=b"x" * 2000), max_frame=100)


def test_malformed_and_unknown_messages():
    garbage = b"\xc1\xc1\xc1"
    with pytest.raises(ProtocolError, match="malformed"):
        decode_frame(len(garbage).to_bytes(4, "big") + garbage, GW)
    unknown = msgspec.msgpack.encode({"type": "launch_missiles"})
    with pytest.raises(ProtocolError, match="invalid"):
        decode_frame(len(unknown).to_bytes(4, "big") + unknown, GW)
    wrong_type = msgspec.msgpack.encode({"type": "cancel", "task_id": 5})
    with pytest.raises(ProtocolError, match="invalid"):
        decode_frame(len(wrong_type).to_bytes(4, "big") + wrong_type, GW)


async def test_framed_stream_over_memory_pair():
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(a, m.GatewayMessage), FramedStream(b, m.GatewayMessage)
    for msg in sample_messages():
        await fa.send(msg)
        assert await fb.receive() == msg
    await fa.aclose()
    with pytest.raises(ConnectionClosed):
        await fb.receive()


async def test_eof_inside_a_frame_is_a_protocol_error():
    a, b = trio.testing.memory_stream_pair()
    fb = FramedStream(b, m.GatewayMessage)
    await a.send_all(encode_frame(m.Drain())[:-1])
    await a.aclose()
    with pytest.raises(ProtocolError, match="inside a frame"):
        await fb.receive()


async def test_handshake_version_mismatch_is_reported_to_both_sides():
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(a, m.GatewayMessage), FramedStream(b, m.GatewayMessage)

    async def old_peer():
        await fa.send(m.Hello(protocol=999, role="node", version="ancient"))
        reply = await fa.receive()
        assert isinstance(reply, m.Error) and reply.code == "version_mismatch"

    async with trio.open_nursery() as n:
        n.start_soon(old_peer)
        with pytest.raises(VersionMismatch, match=f"we speak {m.PROTOCOL_VERSION}, peer .* speaks 999"):
            await fb.handshake("orchestrator", "v", initiator=False, timeout=5)


def test_addresses():
    assert parse_address("tcp:127.0.0.1:80").port == 80
    assert parse_address("unix:/x/y.sock").path == "/x/y.sock"
    assert parse_address("fcvsock:/v.sock:1024").port == 1024
    with pytest.raises(Exception, match="bad address"):
        parse_address("http://nope")


async def test_tunnel_flow_control_and_close():
    a, b = trio.testing.memory_stream_pair()
    fa, fb = FramedStream(a, m.AgentMessage), FramedStream(b, m.AgentMessage)
    left = TunnelMux(fa.send, window=1000, first_id=1)
    right = TunnelMux(fb.send, window=1000, first_id=2)
    got = bytearray()
    payload = bytes(range(256)) * 40  # 10 KiB through a 1000-byte window

    async def pump(fs, mux, accepted):
        while True:
            try:
                msg = await fs.receive()
            except ConnectionClosed:
                return
            new = mux.feed(msg)
            if new is not None:
                accepted.append(new)

    accepted: list = []
    async with trio.open_nursery() as n:
        n.start_soon(pump, fb, right, accepted)
        n.start_soon(pump, fa, left, [])
        s = await left.open()

        async def writer():
            await s.send_all(payload)
            await s.aclose()

        n.start_soon(writer)
        while not accepted:
            await trio.lowlevel.checkpoint()
        r = accepted[0]
        while chunk := await r.receive_some(300):
            assert len(chunk) <= 300
            got += chunk
        n.cancel_scope.cancel()
    assert bytes(got) == payload


def test_tunnel_window_violation_is_protocol_error():
    async def send(_):
        pass

    mux = TunnelMux(send, window=10)
    mux.feed(m.TunnelOpen(conn=2))
    with pytest.raises(ProtocolError, match="window"):
        mux.feed(m.TunnelData(conn=2, data=b"x" * 11))


@pytest.mark.parametrize("length", [0, 1, 4096, 3 * 4096, 3 * 4096 + 7])
async def test_one_chunker_and_one_reassembler_for_files_and_bytes(tmp_path, length):
    import hashlib
    import os

    from marathon.protocol.blobs import BlobWriter, chunks

    data = os.urandom(length)
    src = tmp_path / "src"
    src.write_bytes(data)
    from_file = [p async for p in chunks(str(src), size=4096)]
    from_bytes = [p async for p in chunks(data, size=4096)]
    assert from_file == from_bytes  # the same pieces, whatever the source
    assert [p.last for p in from_file] == [False] * (len(from_file) - 1) + [True]
    assert all(p.data for p in from_file) or length == 0  # no trailing empty piece at exact multiples
    assert from_file[-1].size == length and from_file[-1].sha256 == hashlib.sha256(data).digest()
    # every chunk message is one Chunk: the reassembler takes them all
    for kind in (m.Blob, m.TaskBlob, m.AssignBlob):
        extra = (
            {"task_id": "t", "node_seq": 1} if kind is m.TaskBlob else {"task_id": "t"} if kind is m.AssignBlob else {}
        )
        w = BlobWriter(str(tmp_path / f"out-{kind.__name__}"))
        msgs = [kind(name="x", **extra, **p.fields()) for p in from_file]
        done = [w.add(msg) for msg in msgs + msgs[:1]]  # a resend at the end is ignored
        assert done[-2] and (tmp_path / f"out-{kind.__name__}").read_bytes() == data


async def test_the_reassembler_refuses_a_file_that_is_not_what_the_sender_stated(tmp_path):
    from marathon.protocol.blobs import BlobWriter, chunks

    pieces = [p async for p in chunks(b"a" * 10000, size=4096)]
    w = BlobWriter(str(tmp_path / "out"))
    w.add(m.Blob(name="x", **pieces[0].fields()))
    w.add(m.Blob(name="x", **pieces[1].fields()))
    forged = m.Blob(name="x", **{**pieces[2].fields(), "sha256": b"\0" * 32})
    with pytest.raises(ProtocolError, match="SHA-256"):
        w.add(forged)
    assert w.refused and not w.done and (tmp_path / "out").read_bytes() == b""
    short = BlobWriter(str(tmp_path / "short"))
    with pytest.raises(ProtocolError, match="the sender said 5"):
        short.add(m.Blob(name="x", offset=0, data=b"abc", last=True, size=5))
    gap = BlobWriter(str(tmp_path / "gap"))
    with pytest.raises(ProtocolError, match="expected 0"):
        gap.add(m.Blob(name="x", offset=4096, data=b"abc"))
