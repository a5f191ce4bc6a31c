"""Tasks in real microVMs: the QEMU backend boots the guest image (TCG here, KVM where the
host has it) and the real Claude Code CLI runs inside, through the metering tunnel."""

from __future__ import annotations

import os
import time

import msgspec
import pytest
import trio

from marathon.cli.serve import make_backend
from marathon.errors import ConfigError
from marathon.node.procs import descendants
from marathon.node.sandbox.detect import default_image_dir, image_problem
from tests import fake_anthropic as fa
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir

pytestmark = [pytest.mark.slow, pytest.mark.vm]


@pytest.fixture(scope="module", autouse=True)
def image():
    d = default_image_dir()
    problem = image_problem(d, ("vmlinux", "initramfs.cpio.gz", "rootfs.ext4", "manifest.json"))
    if problem:
        pytest.fail(f"{problem} (make test builds it: make image MARATHON_BIN=dist/marathon)")
    return d


def vm_config(tmp, fake, **kw):
    return marathon_config(
        os.path.join(tmp, "data"),
        anthropic_base_url=fake.url,
        sandbox="qemu",
        vm_mem_mib=768,
        connect_timeout=300.0,
        **kw,
    )


def qemus() -> set[int]:
    out = set()
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"qemu-system" in f.read():
                    out.add(pid)
        except OSError:
            pass
    return out


async def test_task_runs_in_a_qemu_microvm_with_the_real_claude_code():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    script = [
        fa.tool_use("Write", {"file_path": "VM.txt", "content": "written in the guest\n"}),
        fa.tool_use("Bash", {"command": "uname -r; id -u; cat /proc/1/comm; date +%s"}),
        fa.tool_use(
            "Bash", {"command": "df -k --output=size /workspace | tail -1; df -k --output=size $HOME | tail -1"}
        ),
        fa.text("done"),
    ]
    async with fa.open_fake_anthropic(script) as fake:
        config = vm_config(tmp, fake, warm_pool_target=0)
        async with run_marathon(config) as mt:
            task = await mt.submit("write VM.txt", repo=repo, disk_limit="256MiB")
            final = await mt.finish(task["id"], timeout=600)
            assert final["state"] == "succeeded", final
            events = await mt.events(task["id"], follow=False)
            out = [e["data"]["summary"] for e in events if e["event"] == "tool_result"][1]
            kernel, uid, init, clock = out.split()[:4]
            assert kernel.endswith("cloud-amd64") and kernel != os.uname().release  # the guest's own kernel
            assert uid == "4242" and init == "marathon-init"
            assert abs(int(clock) - time.time()) < 60
            # the workspace and HOME are on a task disk of the size asked for, not the guest's root disk
            sizes = [int(x) for x in [e["data"]["summary"] for e in events if e["event"] == "tool_result"][2].split()]
            assert all(200_000 < k <= 262_144 for k in sizes), sizes
            assert "+written in the guest" in (await mt.client.get(f"/v1/tasks/{task['id']}/diff")).text
            assert fa.tokens(final["usage"]) == fake.usage_sent  # metered through the tunnel from inside the VM
            assert qemus() == set()
            assert not os.path.exists(os.path.join(config.data_dir, "sandboxes", task["id"]))


async def test_warm_pool_restores_from_a_snapshot_with_fresh_identity():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))

    def script(body, i):
        cmd = "echo $ANTHROPIC_API_KEY; date +%s; df -k --output=size /workspace | tail -1"
        return [fa.tool_use("Bash", {"command": cmd}), fa.text("ok")][i]

    async with fa.open_fake_anthropic(script) as fake:
        config = vm_config(tmp, fake, slots=2, warm_pool_target=2)
        async with run_marathon(config) as mt:
            pool = mt.node.pool
            with trio.fail_after(600):
                await pool.wait_ready(2)
            await trio.sleep(2)  # let the snapshot's clock fall behind a little
            tasks = [await mt.submit(f"task {i}", repo=repo) for i in range(2)]
            finals = [await mt.finish(t["id"], timeout=600) for t in tasks]
            assert [f["state"] for f in finals] == ["succeeded", "succeeded"], finals
            assert pool.hits == 2 and pool.misses == 0
            tokens, clocks = [], []
            for t in tasks:
                events = await mt.events(t["id"], follow=False)
                logs = [e["data"]["message"] for e in events if e["event"] == "log"]
                assert any("warm, restored from a snapshot" in x for x in logs), logs
                token, clock, size = [e["data"]["summary"] for e in events if e["event"] == "tool_result"][0].split()
                assert int(size) > 9_000_000  # a warm VM's task disk has the node's default size (10 GiB)
                tokens.append(token)
                clocks.append(int(clock))
            assert all(t.startswith("mt_") for t in tokens) and tokens[0] != tokens[1]  # identity re-injected per task
            assert all(abs(c - time.time()) < 60 for c in clocks)  # the guest clock was set from the node's
            node = (await mt.client.get("/v1/nodes")).json()["nodes"][0]
            assert node["pool"]["hits"] >= 2


async def test_vmm_killed_mid_task_fails_the_task_and_leaves_nothing():
    tmp = scratch_dir()
    script, asked = fa.hanging_script()

    async with fa.open_fake_anthropic(script) as fake:
        config = vm_config(tmp, fake, warm_pool_target=0)
        async with run_marathon(config) as mt:
            task = await mt.submit("hang")
            with trio.fail_after(600):
                await asked.wait()
            vms = qemus()
            assert len(vms) == 1
            os.kill(vms.pop(), 9)
            final = await mt.finish(task["id"], timeout=60)
            assert final["state"] == "failed" and final["reason"] == "sandbox_failed", final
            assert qemus() == set()
            assert not os.path.exists(os.path.join(config.data_dir, "sandboxes", task["id"]))


def test_missing_image_is_a_clear_error_at_node_start():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), sandbox="qemu", image_dir=os.path.join(tmp, "no-image"))
    with pytest.raises(
        ConfigError, match=r"node cannot start: the qemu backend cannot run here: guest image missing .* run make image"
    ):
        make_backend(config)
    config = msgspec.structs.replace(config, sandbox="firecracker")
    with pytest.raises(ConfigError, match=r"node cannot start: the firecracker backend cannot run here: .*(kvm|KVM)"):
        make_backend(config)
