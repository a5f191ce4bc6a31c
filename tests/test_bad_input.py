"""Bad input gets a clear error and loses nothing; the daemon keeps serving everyone else."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import trio

from marathon.agent.service import serve_agent
from marathon.errors import AuthError, VersionMismatch
from marathon.protocol.framing import FramedStream
from marathon.protocol import messages as m
from marathon.protocol.framing import encode_frame
from marathon.protocol.transports import open_stream
from tests import fake_anthropic as fa
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow


async def raw_exchange(address: str, data: bytes, decoder_type=m.GatewayMessage) -> list:
    """Send raw bytes, collect every message until the peer closes."""
    stream = await open_stream(address)
    await stream.send_all(data)
    fs = FramedStream(stream, decoder_type)
    out = []
    with trio.fail_after(10):
        async for msg in fs:
            out.append(msg)
    return out


def hello(protocol=m.PROTOCOL_VERSION, role="node"):
    return encode_frame(m.Hello(protocol=protocol, role=role, version="test"))


async def test_gateway_and_api_survive_bad_input(caplog):
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    async with fa.open_fake_anthropic([fa.text("all done")]) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            gw = mt.gateway
            # malformed frame
            out = await raw_exchange(gw, b"\x00\x00\x00\x03\xc1\xc1\xc1")
            assert isinstance(out[-1], m.Error) and out[-1].code == "protocol_error"
            # oversized frame: refused from the length prefix, before any payload arrives
            out = await raw_exchange(gw, (512 * 1024 * 1024).to_bytes(4, "big"))
            assert out[-1].code == "frame_too_large"
            # wrong protocol version
            out = await raw_exchange(gw, hello(protocol=42))
            assert out[-1].code == VersionMismatch.code and "speaks 42" in out[-1].message
            # not a node
            out = await raw_exchange(gw, hello(role="agent"))
            assert out[-1].code == "protocol_error"
            # unexpected first message
            out = await raw_exchange(gw, encode_frame(m.Drain()))
            assert out[-1].code == "protocol_error"
            # wrong node secret: refused and logged
            caplog.clear()
            stream = await open_stream(gw)
            fs = FramedStream(stream, m.GatewayMessage)
            await fs.handshake("node", "x", initiator=True, timeout=5)
            challenge = await fs.receive()
            assert isinstance(challenge, m.Challenge)
            await fs.send(
                m.Authenticate(node_id="intruder", name="intruder", mac=b"0" * 32, capacity=m.Capacity(slots=9))
            )
            reply = await fs.receive()
            assert isinstance(reply, m.Error) and reply.code == AuthError.code
            assert any("wrong node secret" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
            await fs.aclose()
            nodes = (await mt.client.get("/v1/nodes")).json()["nodes"]
            assert [n["name"] for n in nodes] == [config.node_name]

            # API: clear errors
            r = await mt.client.get("/v1/tasks/doesnotexist")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            r = await mt.client.post("/v1/tasks", json={"prompt": "   "})
            assert r.status_code == 400 and "prompt must not be empty" in r.json()["error"]["message"]
            r = await mt.client.post("/v1/tasks", content=b"{not json")
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
            r = await mt.client.post("/v1/tasks", json={"prompt": "x", "max_turns": "lots"})
            assert r.status_code == 400 and "max_turns" in r.json()["error"]["message"]
            r = await mt.client.post("/v1/tasks", json={"prompt": "x", "surprise": 1})
            assert r.status_code == 400 and "surprise" in r.json()["error"]["message"]
            r = await mt.client.get("/v1/tasks", params={"state": "exploded"})
            assert r.status_code == 400 and "unknown state" in r.json()["error"]["message"]
            r = await mt.client.get("/v1/tasks", params={"cursor": "bogus"})
            assert r.status_code == 400
            r = await mt.client.get("/v1/nope")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            r = await mt.client.post("/v1/tasks", content=b"x" * (9 * 1024 * 1024))
            assert r.status_code == 413

            # a repository that does not exist on the node: the task fails with the reason
            task = await mt.submit("x", repo="/nonexistent/repo")
            final = await mt.finish(task["id"])
            assert final["state"] == "failed" and final["reason"] == "repo_error"
            assert "does not exist" in final["message"]

            # and after all that, a real task still runs
            task = await mt.submit("say done", repo=repo)
            final = await mt.finish(task["id"])
            assert final["state"] == "succeeded", final


async def test_cli_rejects_bad_input_before_queuing():
    tmp = scratch_dir()
    env = {**os.environ, "MARATHON_URL": "http://127.0.0.1:9"}  # never reached
    for args, message in [
        (["run", "", "--repo", tmp], "prompt is empty"),
        (["run", "x", "--repo", "/nonexistent/repo"], "does not exist"),
        (["run", "x", "--repo", tmp], "not a git repository"),
    ]:
        res = await trio.run_process(
            [sys.executable, "-m", "marathon", *args], capture_stdout=True, capture_stderr=True, check=False, env=env
        )
        assert res.returncode == 2, (args, res.stderr)
        assert message in res.stderr.decode()
    res = await trio.run_process(
        [sys.executable, "-m", "marathon", "status", "x"], capture_stderr=True, check=False, env=env
    )
    assert res.returncode == 1 and "cannot reach the orchestrator at http://127.0.0.1:9" in res.stderr.decode()


async def test_submit_without_api_key_says_how_to_set_it():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), anthropic_api_key="")
    async with run_marathon(config) as mt:
        r = await mt.client.post("/v1/tasks", json={"prompt": "x"})
        assert r.status_code == 400
        assert "MARATHON_ANTHROPIC_API_KEY" in r.json()["error"]["message"]
        res = await trio.run_process(
            [sys.executable, "-m", "marathon", "run", "x"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "MARATHON_URL": mt.url},
        )
        assert res.returncode == 2 and "MARATHON_ANTHROPIC_API_KEY" in res.stderr.decode()
        assert (await mt.client.get("/v1/tasks")).json()["tasks"] == []


async def test_agent_socket_survives_garbage_and_wrong_versions():
    tmp = scratch_dir()
    sock = os.path.join(tmp, "agent.sock")
    config = marathon_config(os.path.join(tmp, "data"))
    async with trio.open_nursery() as n:
        await n.start(serve_agent, config, f"unix:{sock}")
        out = await raw_exchange(f"unix:{sock}", b"\xff\xff\xff\xff", m.AgentMessage)
        assert out[-1].code == "frame_too_large"
        out = await raw_exchange(f"unix:{sock}", b"\x00\x00\x00\x02\xc1\xc1", m.AgentMessage)
        assert out[-1].code == "protocol_error"
        out = await raw_exchange(f"unix:{sock}", hello(protocol=7), m.AgentMessage)
        assert out[-1].code == "version_mismatch"
        # a proper node still gets a ready agent, and an unexpected message is refused clearly
        stream = await open_stream(f"unix:{sock}")
        fs = FramedStream(stream, m.AgentMessage)
        await fs.handshake("node", "x", initiator=True, timeout=5)
        assert isinstance(await fs.receive(), m.Ready)
        await fs.send(m.CancelRun())
        with trio.fail_after(5):
            reply = await fs.receive()
        assert isinstance(reply, m.Error) and "expected start" in reply.message
        n.cancel_scope.cancel()
