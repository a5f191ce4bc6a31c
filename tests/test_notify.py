"""systemd's notify protocol: READY once the role has started, WATCHDOG pings, STOPPING at
shutdown — observed on a Unix datagram socket standing in for systemd's $NOTIFY_SOCKET, with
a real ``marathon serve --role orchestrator`` process."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys

import httpx
import pytest
import trio

from marathon import notify
from tests.harness import REPO_ROOT, scratch_dir


def test_no_socket_is_a_no_op():
    assert notify.notify("READY=1", env={}) is False
    assert notify.notify("READY=1", env={"NOTIFY_SOCKET": "relative/path"}) is False
    # a socket nobody listens on: no error, just False
    assert notify.notify("READY=1", env={"NOTIFY_SOCKET": "/nonexistent/notify.sock"}) is False


def test_watchdog_interval():
    assert notify.watchdog_interval({}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # not ours
    assert notify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_abstract_and_path_sockets_receive(tmp_path):
    path = str(tmp_path / "n.sock")
    name = "marathon-test-" + secrets.token_hex(6)
    for addr, bind in ((path, path), ("@" + name, "\0" + name)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(bind)
            assert notify.notify("READY=1\nSTATUS=hi", env={"NOTIFY_SOCKET": addr})
            assert s.recv(100) == b"READY=1\nSTATUS=hi"


@pytest.mark.parametrize("form", ["path", "abstract"])
async def test_orchestrator_says_ready_pings_the_watchdog_and_says_stopping(form):
    tmp = scratch_dir()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if form == "path":
        address = os.path.join(tmp, "notify.sock")
        await sock.bind(address)
    else:
        address = "@marathon-test-" + secrets.token_hex(6)
        await sock.bind("\0" + address[1:])
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MARATHON_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_PID")
    }
    env.update(
        NOTIFY_SOCKET=address,
        WATCHDOG_USEC="200000",  # a ping every 0.1 s
        MARATHON_DATA_DIR=os.path.join(tmp, "data"),
        MARATHON_HTTP_LISTEN="tcp:127.0.0.1:0",
        MARATHON_GATEWAY_LISTEN="tcp:127.0.0.1:0",
        PYTHONPATH=str(REPO_ROOT),
    )
    log = open(os.path.join(tmp, "serve.log"), "wb")  # noqa: SIM115  (open for the daemon's lifetime)
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "marathon", "serve", "--role", "orchestrator"], env=env, stderr=log, cwd=tmp
    )
    try:
        with trio.fail_after(60):
            first = (await sock.recv(4096)).decode()
            assert first.startswith("READY=1\nSTATUS=marathon orchestrator: API on http://127.0.0.1:"), first
            url = first.rsplit(" ", 1)[1]
            # READY means ready: the API answers and says so
            async with httpx.AsyncClient(trust_env=False) as client:
                r = await client.get(url + "/readyz")
            assert r.status_code == 200 and r.json()["ready"] is True, r.text
            pings = 0
            while pings < 3:
                msg = (await sock.recv(4096)).decode()
                assert msg == "WATCHDOG=1", msg
                pings += 1
            proc.send_signal(signal.SIGINT)
            while (msg := (await sock.recv(4096)).decode()) == "WATCHDOG=1":
                pass
            assert msg == "STOPPING=1"
            await proc.wait()  # its exit status after SIGINT is run_serve's business, not this test's
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        sock.close()
