"""Events survive: replay after the fact, and follow across dropped connections with no gap
and no duplicate (SSE Last-Event-ID), through the server and through the CLI's client."""

from __future__ import annotations

import os
import signal
import sys
from functools import partial

import pytest
import trio

from bench.common import prepare_claude_stub
from marathon.cli.client import Client
from tests import fake_anthropic as fa
from tests.harness import marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow


async def test_last_event_id_resumes_without_gaps_or_duplicates():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), claude_bin=prepare_claude_stub())
    async with run_marathon(config) as mt:
        task = await mt.submit("lines:3000")
        seen = []
        after = 0
        while True:
            # read at most 250 events per connection, then drop it and resume
            part_ids: list[int] = []

            def stop(e, part_ids=part_ids):
                part_ids.append(e["id"])
                return len(part_ids) >= 250

            part = await mt.events(task["id"], after=after, until=stop)
            seen += [e["id"] for e in part]
            if len(part) < 250 or part[-1]["event"] == "state" and part[-1]["data"]["state"] == "succeeded":
                break
            after = part[-1]["id"]
        full = await mt.events(task["id"], follow=False)
        assert seen == [e["id"] for e in full] == list(range(1, len(full) + 1))
        assert sum(1 for e in full if e["event"] == "text") == 3000


async def chaos_proxy(target_port: int, cut_after: int, *, task_status=trio.TASK_STATUS_IGNORED):
    """A TCP proxy that cuts every connection after ``cut_after`` response bytes."""

    async def handle(client):
        upstream = await trio.open_tcp_stream("127.0.0.1", target_port)

        async def up():
            while data := await client.receive_some(65536):
                await upstream.send_all(data)

        async def down(scope):
            sent = 0
            while data := await upstream.receive_some(4096):
                data = data[: max(0, cut_after - sent)]
                if data:
                    await client.send_all(data)
                sent += len(data)
                if sent >= cut_after:
                    break
            scope.cancel()

        try:
            async with trio.open_nursery() as n:
                n.start_soon(up)
                n.start_soon(down, n.cancel_scope)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(upstream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def test_cli_client_follows_through_dropped_connections():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), claude_bin=prepare_claude_stub())
    async with run_marathon(config) as mt:
        task = await mt.submit("lines:2000")
        port = int(mt.url.rsplit(":", 1)[1])
        async with trio.open_nursery() as n:
            proxy_port = await n.start(chaos_proxy, port, 20_000)

            def follow():
                client = Client(
                    f"http://127.0.0.1:{proxy_port}", token=mt.client.headers["Authorization"][7:], retries=1000
                )
                try:
                    return [ev.id for ev in client.events(task["id"])]
                finally:
                    client.close()

            ids = await trio.to_thread.run_sync(follow)
            n.cancel_scope.cancel()
        full = await mt.events(task["id"], follow=False)
        assert ids == [e["id"] for e in full]
        assert len(full) > 2000


async def test_ctrl_c_with_cancel_on_interrupt_cancels_the_task():
    tmp = scratch_dir()
    script, asked = fa.hanging_script()

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            async with trio.open_nursery() as n:
                proc = await n.start(
                    partial(
                        trio.run_process,
                        [sys.executable, "-m", "marathon", "run", "hang", "--cancel-on-interrupt"],
                        env={**os.environ, "MARATHON_URL": mt.url},
                        check=False,
                        stdout=__import__("subprocess").PIPE,
                    )
                )
                with trio.fail_after(60):
                    await asked.wait()
                proc.send_signal(signal.SIGINT)
                out = b""
                while chunk := await proc.stdout.receive_some(4096):
                    out += chunk
                rc = await proc.wait()
            text = out.decode()
            task_id = text.split()[1]
            assert rc == 1, text
            assert (await mt.task(task_id))["state"] == "cancelled"
            assert "cancelled" in text
