"""Firecracker against the real binary (``make firecracker``), with a tiny bare-metal guest
(``tests/fc_guest/guest.S``: prints a banner, then "tick N" every ~50 ms from the APIC timer).

Runs wherever /dev/kvm exists, including the software ``kvm_pvm`` driver (which runs this
guest but not a stock Linux kernel).  The Linux-guest test runs only where ``detect()`` says
Firecracker can boot the image, and is skipped with detect()'s reason elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import trio

from marathon.errors import ProtocolError, SandboxError
from marathon.node.procs import alive
from marathon.node.sandbox import SandboxOptions
from marathon.node.sandbox.fc_net import _cgroup_mounts, find_stale_vmms, list_netns, veth_name
from marathon.node.sandbox.firecracker import (
    FirecrackerBackend,
    FirecrackerVM,
    Jailer,
    detect,
    find_binary,
    open_vm,
    reap_leftovers,
)
from marathon.protocol.transports import open_stream
from tests.fc_guest.build import BANNER, build_guest

PREFIX = f"mft{os.getpid() % 100000}-"  # this session's VMs, namespaces, jails
TICK = re.compile(r"tick ([0-9a-f]{8})")
MEM = 32


@pytest.fixture(scope="session")
def fc_bin() -> str:
    path = find_binary("firecracker")
    if not path:
        pytest.fail("the firecracker binary is missing: run make firecracker")
    return path


@pytest.fixture(scope="session")
def jailer_bin(fc_bin) -> str:
    path = os.path.join(os.path.dirname(fc_bin), "jailer")
    if not os.access(path, os.X_OK):
        pytest.fail("the jailer binary is missing: run make firecracker")
    return path


@pytest.fixture(scope="session")
def guest(tmp_path_factory) -> str:
    if not os.path.exists("/dev/kvm"):
        pytest.fail("no /dev/kvm: the Firecracker tests need KVM (kvm_pvm is enough for the tiny guest)")
    if os.geteuid() != 0:
        pytest.fail("the Firecracker tests need root (network namespaces, mount namespaces, jailer)")
    try:
        return build_guest(str(tmp_path_factory.mktemp("fc_guest")))
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"could not build the tiny guest: {exc}")


@pytest.fixture
def disk(tmp_path) -> str:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(b"marathon-disk\n")
        f.truncate(4 << 20)
    return str(path)


@pytest.fixture
def short_dir():
    """A short directory (AF_UNIX paths are limited to 107 bytes; jails nest deep)."""
    path = tempfile.mkdtemp(prefix="fct", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def ticks(vm: FirecrackerVM) -> list[int]:
    return [int(x, 16) for x in TICK.findall(vm.serial())]


async def until(pred, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``pred`` until true; fail after ``timeout``."""
    with trio.move_on_after(timeout):
        while not pred():  # noqa: ASYNC110  (the guest's serial output is a file: nothing signals it)
            await trio.sleep(0.005)
        return
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def leftovers(root: str) -> list[str]:
    out = [f"process {p}" for p in find_stale_vmms(root, PREFIX)]
    out += [f"netns {n}" for n in list_netns(PREFIX)]
    for dirpath, _, files in os.walk(root):
        out += [f"file {os.path.join(dirpath, f)}" for f in files if f in ("fc-vm.json", "api.sock", "vsock.sock")]
    for _, mnt in _cgroup_mounts():
        parent = os.path.join(mnt, "firecracker")
        if os.path.isdir(parent):
            out += [f"cgroup {parent}/{d}" for d in os.listdir(parent) if d.startswith(PREFIX)]
    return out


async def boot(vm: FirecrackerVM, kernel: str, **kw) -> None:
    await vm.configure(kernel=kernel, vcpus=1, mem_mib=MEM, **kw)
    await vm.start()
    await until(lambda: len(ticks(vm)) >= 2, what="the guest's ticks")


# --------------------------------------------------------------------------- detection


def test_detect_is_honest_about_this_host(tmp_path):
    ok, reason = detect()
    with open("/proc/cpuinfo") as f:
        flags = {w for line in f if line.startswith("flags") for w in line.split()}
    if os.path.isdir("/sys/module/kvm_pvm") and not flags & {"vmx", "svm"}:
        assert not ok and "kvm_pvm" in reason and "no vmx/svm" in reason
    if not os.path.exists("/dev/kvm"):
        assert not ok and "no /dev/kvm" in reason
    ok, reason = detect(str(tmp_path / "nope"), str(tmp_path))
    assert not ok and "run make firecracker" in reason and "run make image" in reason


@pytest.mark.firecracker
def test_backend_refuses_with_the_detect_reason(fc_bin):
    ok, reason = detect(fc_bin)
    if ok:
        pytest.skip("Firecracker can boot Linux guests here")
    with pytest.raises(SandboxError) as err:
        FirecrackerBackend(firecracker_bin=fc_bin)
    assert reason in str(err.value)


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.firecracker
async def test_boot_pause_snapshot_kill_restore_resume(fc_bin, guest, disk, tmp_path):
    root = str(tmp_path)
    vm = FirecrackerVM(f"{root}/a", firecracker_bin=fc_bin, prefix=PREFIX, network="tap")
    try:
        info = await vm.spawn()
        assert info["state"] == "Not started" and info["vmm_version"] == "1.12.1"
        await boot(vm, guest, rootfs=disk, vsock_cid=3)
        assert BANNER in vm.serial()
        assert os.path.exists(vm.vsock_uds)  # the host side of the hybrid vsock

        await vm.pause()
        assert await vm.state() == "Paused"
        at_pause = max(ticks(vm))
        snap = await vm.snapshot(f"{root}/snap")
        assert max(ticks(vm)) == at_pause  # paused: no tick while the snapshot was written
        assert {"vm.state", "vm.mem", "rootfs.ext4", "snapshot.json"} <= set(os.listdir(snap.dir))
        assert os.path.getsize(os.path.join(snap.dir, "vm.mem")) == MEM << 20
        await vm.kill()  # a crash: sockets and disk stay behind
        assert vm.exited() is not None

        async with open_vm(f"{root}/b", firecracker_bin=fc_bin, prefix=PREFIX, network="tap") as clone:
            await clone.restore_from(snap, resume=False)
            assert await clone.state() == "Paused"
            await clone.resume()
            await until(lambda: len(ticks(clone)) >= 2, what="ticks after restore")
            # the counter lives in guest memory: it continues exactly where the snapshot was
            assert ticks(clone)[0] == at_pause + 1
            assert BANNER not in clone.serial()  # resumed, not rebooted
            with open(os.path.join(clone.vm_dir, "rootfs.ext4"), "rb") as f:
                assert f.read(14) == b"marathon-disk\n"  # its own copy of the snapshot's disk
            assert os.path.exists(clone.vsock_uds) and clone.vsock_uds != vm.vsock_uds
    finally:
        await vm.destroy()
    assert leftovers(root) == []
    assert sorted(os.listdir(root)) == ["disk.img", "snap"]


@pytest.mark.firecracker
async def test_two_clones_of_one_snapshot_run_side_by_side(fc_bin, guest, tmp_path):
    root = str(tmp_path)
    async with open_vm(f"{root}/base", firecracker_bin=fc_bin, prefix=PREFIX) as vm:
        await boot(vm, guest, vsock_cid=3)
        snap = await vm.snapshot(f"{root}/snap")
        at_snap = max(ticks(vm))
    async with (
        open_vm(f"{root}/c1", firecracker_bin=fc_bin, prefix=PREFIX) as c1,
        open_vm(f"{root}/c2", firecracker_bin=fc_bin, prefix=PREFIX) as c2,
    ):
        async with trio.open_nursery() as n:
            n.start_soon(c1.restore_from, snap)
            n.start_soon(c2.restore_from, snap)
        await until(lambda: len(ticks(c1)) >= 3 and len(ticks(c2)) >= 3, what="both clones ticking")
        assert ticks(c1)[0] == ticks(c2)[0] == at_snap + 1
        # each clone bound "/run/marathon-fc/vm/vsock.sock" in its own mount namespace
        assert os.path.exists(c1.vsock_uds) and os.path.exists(c2.vsock_uds)
        assert not os.path.exists("/run/marathon-fc/vm/vsock.sock")
    assert leftovers(root) == []


@pytest.mark.firecracker
async def test_stale_vsock_socket_is_removed_before_load(fc_bin, guest, tmp_path):
    """The snapshot names the vsock socket path; a killed VMM leaves that file behind, and
    Firecracker refuses to bind it again."""
    root = str(tmp_path)
    vm = FirecrackerVM(f"{root}/vm", firecracker_bin=fc_bin, prefix=PREFIX)
    await vm.spawn()
    await boot(vm, guest, vsock_cid=3)
    snap = await vm.snapshot(f"{root}/snap")
    await vm.kill()
    assert os.path.exists(vm.vsock_uds)  # the stale socket

    again = FirecrackerVM(f"{root}/vm", firecracker_bin=fc_bin, prefix=PREFIX)  # same place, same path
    await again.spawn()
    with pytest.raises(SandboxError) as err:
        await again.restore_from(snap, remove_stale_vsock=False)
    assert "/snapshot/load -> 400" in str(err.value)
    assert "VsockUnixBackend: Error binding to the host-side Unix socket: Address in use" in str(err.value)
    await until(lambda: again.exited() is not None, what="firecracker to exit after the failed load")
    await again.destroy()

    os.makedirs(f"{root}/vm", exist_ok=True)
    with open(f"{root}/vm/vsock.sock", "w"):  # stale again (destroy removed the first one)
        pass
    async with open_vm(f"{root}/vm", firecracker_bin=fc_bin, prefix=PREFIX) as fresh:
        await fresh.restore_from(snap)  # removes the stale file first
        await until(lambda: len(ticks(fresh)) >= 2, what="ticks after restore over a stale socket")
    await vm.destroy()
    assert leftovers(root) == []


@pytest.mark.firecracker
async def test_api_errors_carry_firecrackers_fault_message(fc_bin, guest, tmp_path):
    async with open_vm(str(tmp_path / "vm"), firecracker_bin=fc_bin, prefix=PREFIX) as vm:
        with pytest.raises(
            SandboxError, match=r"PUT /machine-config -> 400: Machine config error: The number of vCPUs"
        ):
            await vm.api.put("/machine-config", {"vcpu_count": 0, "mem_size_mib": MEM})
        with pytest.raises(SandboxError, match=r"PUT /boot-source -> 400: .*kernel"):
            await vm.configure(kernel=str(tmp_path / "missing-kernel"))
        with pytest.raises(SandboxError, match="/actions -> 400"):
            await vm.start()  # not configured
        await vm.kill()
        with pytest.raises(SandboxError, match="firecracker API GET /"):
            await vm.state()
    bad = FirecrackerVM(str(tmp_path / "bad"), firecracker_bin=fc_bin, prefix=PREFIX, log_level="Loud")
    with pytest.raises(SandboxError, match="exited before its API was up"):
        await bad.spawn()
    await bad.destroy()
    assert leftovers(str(tmp_path)) == []


@pytest.mark.firecracker
async def test_destroy_is_shielded_bounded_and_idempotent(fc_bin, guest, tmp_path):
    vm = FirecrackerVM(str(tmp_path / "vm"), firecracker_bin=fc_bin, prefix=PREFIX, network="tap")
    await vm.spawn()
    await boot(vm, guest)
    with trio.CancelScope() as scope:
        scope.cancel()
        await vm.destroy()  # runs to completion inside a cancelled scope
    await vm.destroy()
    assert vm.exited() is not None
    assert not os.path.exists(vm.vm_dir)
    assert leftovers(str(tmp_path)) == []
    assert "tick" in vm.diagnostics()  # kept from before the directory went


# --------------------------------------------------------------------------- jailer


def _memory_cgroup() -> tuple[str, str]:
    """(cgroup setting for the jailer, file to read back) on this host's hierarchy."""
    kinds = {k for k, _ in _cgroup_mounts()}
    if kinds == {"cgroup2"}:
        return "memory.max=268435456", "memory.max"
    return "memory.limit_in_bytes=268435456", "memory.limit_in_bytes"


@pytest.mark.firecracker
async def test_jailer_start_snapshot_restore_and_cleanup(fc_bin, jailer_bin, guest, disk, tmp_path, short_dir):
    setting, knob = _memory_cgroup()
    jail = Jailer(binary=jailer_bin, uid=4243, gid=4243, chroot_base=short_dir, cgroups=(setting,))
    root = str(tmp_path)
    async with open_vm(f"{root}/a", firecracker_bin=fc_bin, prefix=PREFIX, jailer=jail, network="tap") as vm:
        await boot(vm, guest, rootfs=disk, vsock_cid=3)
        assert vm.jail_dir.startswith(short_dir) and os.path.isdir(vm.root)
        assert os.stat(vm.root).st_uid == 4243
        with open(f"/proc/{vm.proc.pid}/status") as f:
            status = f.read()
        assert re.search(r"^Uid:\s+4243\s", status, re.M), "firecracker does not run as the jail uid"
        limits = [os.path.join(m, "firecracker", vm.id, knob) for _, m in _cgroup_mounts()]
        assert any(os.path.exists(p) and read_text(p).strip() == "268435456" for p in limits)
        assert vm.vsock_uds == os.path.join(vm.root, "vsock.sock") and os.path.exists(vm.vsock_uds)
        snap = await vm.snapshot(f"{root}/snap")
        at_snap = max(ticks(vm))
        async with open_vm(f"{root}/b", firecracker_bin=fc_bin, prefix=PREFIX, jailer=jail, network="tap") as clone:
            await clone.restore_from(snap)
            await until(lambda: len(ticks(clone)) >= 2, what="ticks in the jailed clone")
            assert ticks(clone)[0] == at_snap + 1
            assert clone.jail_dir != vm.jail_dir and os.path.exists(clone.vsock_uds)
        assert not os.path.exists(clone.jail_dir)
    assert not os.path.exists(vm.jail_dir)  # chroot gone
    assert os.listdir(os.path.join(short_dir, "firecracker")) == []
    assert leftovers(root) == []


# --------------------------------------------------------------------------- network


@pytest.mark.firecracker
async def test_tap_in_its_own_network_namespace(fc_bin, guest, tmp_path):
    async with open_vm(str(tmp_path / "vm"), firecracker_bin=fc_bin, prefix=PREFIX, network="tap") as vm:
        await boot(vm, guest)
        ns = vm.net.netns
        assert ns in list_netns(PREFIX)
        links = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "tap0"], capture_output=True, text=True)
        assert "tap0" in links.stdout and "UP" in links.stdout
        addrs = subprocess.run(["ip", "-n", ns, "-o", "addr", "show", "tap0"], capture_output=True, text=True).stdout
        assert "172.16.0.1/30" in addrs
        # the VMM itself lives in that namespace, not in the host's
        assert os.stat(f"/proc/{vm.proc.pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
        assert not os.path.exists("/sys/class/net/tap0")
    assert ns not in list_netns(PREFIX)
    assert leftovers(str(tmp_path)) == []


@pytest.mark.firecracker
async def test_egress_veth_and_nat_are_torn_down(fc_bin, guest, tmp_path):
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed")
    async with open_vm(str(tmp_path / "vm"), firecracker_bin=fc_bin, prefix=PREFIX, network="egress") as vm:
        await boot(vm, guest)
        ns, hv = vm.net.netns, vm.net.host_veth
        assert hv == veth_name(ns) and os.path.exists(f"/sys/class/net/{hv}")
        route = subprocess.run(["ip", "-n", ns, "route", "show", "default"], capture_output=True, text=True).stdout
        assert "via 10.201." in route
        nat = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
        assert f"marathon-fc:{ns}" in nat
    assert not os.path.exists(f"/sys/class/net/{hv}")
    nat = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    flt = subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
    assert f"marathon-fc:{ns}" not in nat + flt
    assert leftovers(str(tmp_path)) == []


# --------------------------------------------------------------------------- crash leftovers


CRASHING_NODE = """
import json, sys, trio
from marathon.node.sandbox.firecracker import FirecrackerVM, Jailer
root, fc, jailer, guest, prefix, short_dir, cgroup = sys.argv[1:]
async def main():
    jail = Jailer(binary=jailer, uid=4243, gid=4243, chroot_base=short_dir, cgroups=(cgroup,))
    vms = [FirecrackerVM(root + "/t1/vm", firecracker_bin=fc, prefix=prefix, network="tap"),
           FirecrackerVM(root + "/t2/vm", firecracker_bin=fc, prefix=prefix, network="tap", jailer=jail)]
    for vm in vms:
        await vm.spawn()
        await vm.configure(kernel=guest, vcpus=1, mem_mib=32, vsock_cid=3)
        await vm.start()
    print(json.dumps([[vm.vm_dir, vm.jail_dir, vm.proc.pid] for vm in vms]), flush=True)
    await trio.sleep_forever()
trio.run(main)
"""


@pytest.mark.firecracker
async def test_reap_leftovers_after_a_crash(fc_bin, jailer_bin, guest, tmp_path, short_dir):
    """A node process dies (SIGKILL) with VMs up.  A VMM started without the jailer dies with its
    node (parent-death signal); a jailed one cannot (its change of uid clears the signal) and
    stays an orphan, and directories, jails, cgroups and namespaces stay.  The next node's
    reaper removes them."""
    import json

    root = str(tmp_path / "run")
    args = [root, fc_bin, jailer_bin, guest, PREFIX, short_dir, _memory_cgroup()[0]]
    node = await trio.lowlevel.open_process(
        [sys.executable, "-c", CRASHING_NODE, *args],
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        line = b""
        with trio.fail_after(20):
            assert node.stdout is not None
            while not line.endswith(b"\n"):
                chunk = await node.stdout.receive_some(4096)
                assert chunk, "the crashing node died early"
                line += chunk
        vms = json.loads(line)
    finally:
        node.kill()  # the crash
        await node.wait()
    subprocess.run(["ip", "netns", "add", PREFIX + "stray"], check=True)
    plain, jailed = vms[0][2], vms[1][2]
    await until(lambda: not alive({plain}), what="the unjailed VMM dying with its node")
    assert find_stale_vmms(root, PREFIX) == [jailed]
    assert len(list_netns(PREFIX)) == 3
    assert all(os.path.isdir(vm_dir) for vm_dir, _, _ in vms) and os.path.isdir(vms[1][1])

    removed = await reap_leftovers(root, prefix=PREFIX)  # as the next node process would

    assert sum(r.startswith("process ") for r in removed) == 1
    assert sum(r.startswith("dir ") for r in removed) == 2
    assert f"netns {PREFIX}stray" in removed
    for vm_dir, _, _ in vms:
        assert not os.path.exists(vm_dir)
    assert not os.path.exists(vms[1][1])
    assert leftovers(root) == [] and list_netns(PREFIX) == []
    assert await reap_leftovers(root, prefix=PREFIX) == []  # nothing twice


# --------------------------------------------------------------------------- backend


@pytest.mark.firecracker
async def test_backend_with_a_stand_in_image(fc_bin, guest, disk, tmp_path):
    """The node-facing shape, on the tiny guest: a sandbox with an fcvsock address."""
    image = tmp_path / "image"
    image.mkdir()
    shutil.copy(guest, image / "vmlinux")
    shutil.copy(disk, image / "rootfs.ext4")
    backend = FirecrackerBackend(
        firecracker_bin=fc_bin, image_dir=str(image), vcpus=1, mem_mib=MEM, prefix=PREFIX, check=False
    )
    assert backend.name == "firecracker" and "network namespace" in backend.info.isolation
    run_dir = str(tmp_path / "task" / "run")
    sandbox = await backend.create("task-1", run_dir, SandboxOptions(disk=64 * 1024 * 1024))
    try:
        assert sandbox.agent_address == f"fcvsock:{run_dir}/vm/vsock.sock:1024"
        assert sandbox.vm.api is not None
        drives = {d["drive_id"]: d for d in (await sandbox.vm.api.get("/vm/config"))["drives"]}
        assert (
            drives["task"]["is_read_only"] is False
            and os.path.getsize(drives["task"]["path_on_host"]) == 64 * 1024 * 1024
        )
        await until(lambda: "tick" in sandbox.diagnostics(), what="guest output in diagnostics")
        assert sandbox.exited() is None
        # Firecracker accepts the hybrid-vsock connection; without a guest driver nobody answers
        # the CONNECT, so the dial must be bounded by the caller (as connect_agent does).
        with trio.move_on_after(0.3) as scope:
            await open_stream(sandbox.agent_address)
        assert scope.cancelled_caught
    finally:
        await sandbox.destroy()
    assert sandbox.exited() is not None
    assert not os.path.exists(os.path.join(run_dir, "vm"))
    assert leftovers(str(tmp_path)) == []


# --------------------------------------------------------------------------- Linux guest


@pytest.fixture
def linux_capable() -> None:
    """Skip (with detect()'s reason) where Firecracker cannot boot a Linux guest.  A sync
    fixture: pytest.skip inside a trio test loses its reason in the exception group."""
    ok, reason = detect()
    if not ok:
        pytest.skip(f"Firecracker Linux guest: {reason}")


@pytest.mark.vm
@pytest.mark.firecracker
async def test_linux_guest_agent_over_vsock(linux_capable, tmp_path):
    """The real guest image under Firecracker: the agent answers over the hybrid vsock.
    Runs only where detect() says Firecracker can boot Linux (hardware KVM)."""
    from marathon.protocol import messages as m
    from marathon.protocol.framing import FramedStream

    backend = FirecrackerBackend(prefix=PREFIX, vcpus=2, mem_mib=1024)
    sandbox = await backend.create("linux-1", str(tmp_path / "run"))
    try:
        with trio.fail_after(60):
            while True:
                try:
                    with trio.move_on_after(2):
                        stream = await open_stream(sandbox.agent_address)
                        break
                except (OSError, ProtocolError):
                    pass
                assert sandbox.exited() is None, sandbox.diagnostics()
                await trio.sleep(0.2)
            fs = FramedStream(stream, m.AgentMessage)
            await fs.handshake("node", "test", initiator=True, timeout=30)
            assert isinstance(await fs.receive(), m.Ready)
            await fs.aclose()
    finally:
        await sandbox.destroy()
    assert leftovers(str(tmp_path)) == []
