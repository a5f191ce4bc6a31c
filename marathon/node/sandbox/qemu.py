"""The ``qemu`` backend: QEMU ``-M microvm`` with the guest image, KVM with hardware
virtualisation and TCG otherwise.

Per VM: a qcow2 overlay on the image's rootfs, user networking restricted to one forwarded
port (the agent's; the guest has no other way out — the API goes through the agent channel),
QMP on a Unix socket.  Snapshot = stop + migrate to a file; restore = a new QEMU with
``-incoming`` from that file, a fresh overlay on the snapshot's (frozen) disk, then ``cont``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass

import trio

from marathon.errors import SandboxError
from marathon.node.cgroups import Cgroups, Group, Limits
from marathon.node.disk import make_image
from marathon.node.procs import kill_tree
from marathon.node.sandbox import SandboxInfo, SandboxOptions
from marathon.node.spawn import Child, spawn
from marathon.node.sandbox.detect import default_image_dir, hardware_kvm, host_tsc_khz, image_problem

log = logging.getLogger("marathon.sandbox.qemu")
GUEST_IP = "10.0.2.15"
AGENT_PORT = 7000
GUEST_WORKSPACE = "/workspace"
# ACPI on: the Debian cloud kernel finds virtio-mmio devices through the DSDT, not virtio_mmio.device=.
MACHINE = "microvm,acpi=on,auto-kernel-cmdline=off,x-option-roms=off"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Qmp:
    """A small async QMP client: one command at a time, events skipped."""

    def __init__(self, stream: trio.SocketStream):
        self._stream = stream
        self._buf = b""

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> Qmp:
        delay = 0.005
        with trio.fail_after(timeout):
            while True:
                try:
                    stream = await trio.open_unix_socket(path)
                    break
                except OSError:
                    await trio.sleep(delay)
                    delay = min(delay * 2, 0.1)
            qmp = cls(stream)
            await qmp._line()  # greeting
            await qmp.execute("qmp_capabilities")
        return qmp

    async def _line(self) -> dict:
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise SandboxError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def execute(self, command: str, **arguments):
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        await self._stream.send_all(json.dumps(msg).encode() + b"\n")
        while True:
            reply = await self._line()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise SandboxError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


@dataclass(frozen=True)
class QemuSnapshot:
    """A VM paused after its agent came up: its memory/device state and its (frozen) disk."""

    state: str
    disk: str
    directory: str
    task_disk_size: int = 0  # the blank task disk the base VM had (each clone gets a new one of this size)


class QemuSandbox:
    def __init__(self, task_id: str, proc: Child, run_dir: str, port: int, group: Group | None = None):
        self.id = task_id
        self._proc = proc
        self.run_dir = run_dir
        self.port = port
        self.agent_address = f"tcp:127.0.0.1:{port}"
        self.workspace = GUEST_WORKSPACE
        self.host_workspace: str | None = None
        self.task_disk_size = 0
        self.group = group
        self.start_fields: dict = {}
        self._destroyed = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def exited(self) -> int | None:
        return self._proc.poll()

    def diagnostics(self) -> str:
        out = []
        for name in ("serial.log", "qemu.log"):
            try:
                with open(os.path.join(self.run_dir, name), "rb") as f:
                    f.seek(max(0, os.path.getsize(f.name) - 1500))
                    text = f.read().decode(errors="replace").strip()
                if text:
                    out.append(f"[{name}] {text}")
            except OSError:
                pass
        return "\n".join(out)

    async def qmp(self) -> Qmp:
        return await Qmp.connect(os.path.join(self.run_dir, "qmp.sock"))

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            if self._proc.poll() is None:
                await kill_tree(self._proc.pid)
                await self._proc.wait()
            if self.group is not None:
                await self.group.destroy()
            await trio.to_thread.run_sync(lambda: shutil.rmtree(self.run_dir, ignore_errors=True))


class QemuBackend:
    name = "qemu"

    def __init__(
        self,
        *,
        image_dir: str = "",
        data_dir: str = "",
        vcpus: int = 2,
        mem_mib: int = 1024,
        accel: str = "auto",
        qemu_bin: str = "qemu-system-x86_64",
        boot_timeout: float = 300.0,
        cgroups: Cgroups | None = None,
        default_disk: int = 10 * 1024**3,
    ):
        self.cgroups = cgroups or Cgroups(0)
        self.default_disk = default_disk
        self.image_dir = image_dir or default_image_dir(data_dir)
        self.qemu = shutil.which(qemu_bin) or ""
        if not self.qemu:
            raise SandboxError(
                f"the qemu backend cannot run here: {qemu_bin} is not installed (Debian qemu-system-x86)"
            )
        problem = image_problem(self.image_dir, ("vmlinux", "initramfs.cpio.gz", "rootfs.ext4", "manifest.json"))
        if problem:
            raise SandboxError(f"the qemu backend cannot run here: {problem}")
        with open(os.path.join(self.image_dir, "manifest.json")) as f:
            self.manifest = json.load(f)
        if self.manifest.get("marathon", {}).get("placeholder"):
            raise SandboxError(
                f"the guest image in {self.image_dir} has a placeholder agent: "
                "rebuild it with `make image MARATHON_BIN=dist/marathon`"
            )
        kvm_ok, kvm_why = hardware_kvm()
        if accel == "kvm" and not kvm_ok:
            raise SandboxError(f"the qemu backend cannot use KVM here: {kvm_why}")
        self.accel = "kvm" if kvm_ok and accel in ("auto", "kvm") else "tcg"
        self.tsc_khz = host_tsc_khz() if self.accel == "tcg" else None
        if self.accel == "tcg" and not self.tsc_khz:
            raise SandboxError("cannot find the host TSC frequency for TCG guests: set MARATHON_TSC_KHZ")
        self.vcpus, self.mem_mib, self.boot_timeout = vcpus, mem_mib, boot_timeout
        warnings = [] if kvm_ok else [f"qemu: no hardware KVM ({kvm_why}); guests run under TCG emulation (slow)"]
        self.info = SandboxInfo(
            "qemu",
            f"QEMU microvm ({'KVM' if self.accel == 'kvm' else 'TCG emulation'}), own kernel, "
            "no network but the agent's forwarded port",
            warnings,
        )

    def cmdline(self) -> str:
        parts = [
            "console=ttyS0 root=/dev/vda rw panic=-1 quiet",
            f"marathon.ip={GUEST_IP}/24 marathon.gw=10.0.2.2 marathon.listen=tcp:0.0.0.0:{AGENT_PORT}",
            "marathon.on_exit=poweroff",
        ]
        if self.tsc_khz:
            hz = int(self.manifest.get("kernel", {}).get("hz", 250))
            parts.append(f"tsc_early_khz={self.tsc_khz} lpj={self.tsc_khz * 1000 // hz} tsc=reliable")
        return " ".join(parts)

    def argv(self, run_dir: str, disk: str, port: int, *, incoming: str | None = None,
             task_disk: str | None = None) -> list[str]:  # fmt: skip
        accel = "tcg,thread=multi,tb-size=256" if self.accel == "tcg" else "kvm"
        argv = [
            self.qemu,
            "-name",
            "marathon-vm,debug-threads=off",
            "-M",
            MACHINE,
            "-accel",
            accel,
            "-cpu",
            "max" if self.accel == "tcg" else "host",
            "-smp",
            str(self.vcpus),
            "-m",
            str(self.mem_mib),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            os.path.join(self.image_dir, "vmlinux"),
            "-initrd",
            os.path.join(self.image_dir, "initramfs.cpio.gz"),
            "-append",
            self.cmdline(),
            "-serial",
            f"file:{os.path.join(run_dir, 'serial.log')}",
            "-drive",
            f"id=root,file={disk},format=qcow2,if=none,discard=unmap",
            "-device",
            "virtio-blk-device,drive=root",
            *(
                [
                    "-drive",
                    f"id=task,file={task_disk},format=raw,if=none,discard=unmap",
                    "-device",
                    "virtio-blk-device,drive=task",
                ]
                if task_disk
                else []
            ),  # fmt: skip
            "-netdev",
            f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-{GUEST_IP}:{AGENT_PORT}",
            "-device",
            "virtio-net-device,netdev=n0",
            "-device",
            "virtio-rng-device",
            "-qmp",
            f"unix:{os.path.join(run_dir, 'qmp.sock')},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", incoming]
        return argv

    async def _overlay(self, path: str, backing: str, fmt: str) -> None:
        res = await trio.run_process(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, path],
            capture_stderr=True,
            check=False,
        )
        if res.returncode != 0:
            raise SandboxError(f"qemu-img: {res.stderr.decode(errors='replace').strip()}")

    def vmm_limits(self, limits: Limits | None) -> Limits:
        """The VMM's cgroup: the task's limits, but never less memory than the guest's plus QEMU's own
        (its TCG translation cache is 256 MiB)."""
        floor = (self.mem_mib + 512) * 1024 * 1024
        limits = limits or Limits(pids=1024, cpus=float(self.vcpus))
        return Limits(memory=max(limits.memory or 0, floor), pids=limits.pids or 1024, cpus=limits.cpus)

    async def _start(self, task_id: str, run_dir: str, disk: str, *, incoming: str | None = None,
                     limits: Limits | None = None, task_disk_size: int = 0) -> QemuSandbox:  # fmt: skip
        port = free_port()
        task_disk = None
        if task_disk_size:  # the guest's /workspace, HOME and TMPDIR: a disk of the task's size
            task_disk = os.path.join(run_dir, "task.img")
            await make_image(task_disk, task_disk_size)
        try:
            group = self.cgroups.create(f"vm-{os.path.basename(run_dir)}-{task_id}", self.vmm_limits(limits))
        except OSError as exc:
            raise SandboxError(f"could not create the VM's cgroup: {exc}") from None
        with open(os.path.join(run_dir, "qemu.log"), "ab") as logf:
            try:
                # forked on the trio thread with a parent-death signal: the VM dies with its node
                proc = spawn(self.argv(run_dir, disk, port, incoming=incoming, task_disk=task_disk), env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                             stdout=logf.fileno(), stderr=logf.fileno(), enter=group.procs_files if group else (),
                             pdeathsig=True)  # fmt: skip
            except OSError as exc:
                if group is not None:
                    await group.destroy()
                raise SandboxError(f"could not start QEMU: {exc}") from None
        with open(os.path.join(run_dir, "vm.json"), "w") as f:  # for the reaper after a crash
            json.dump({"pid": proc.pid, "task": task_id, "started": time.time()}, f)
        sb = QemuSandbox(task_id, proc, run_dir, port, group)
        sb.task_disk_size = task_disk_size
        return sb

    async def create(self, task_id: str, run_dir: str, options: SandboxOptions = SandboxOptions()) -> QemuSandbox:
        """Cold boot."""
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        disk = os.path.join(run_dir, "disk.qcow2")
        await self._overlay(disk, os.path.join(self.image_dir, "rootfs.ext4"), "raw")
        return await self._start(task_id, run_dir, disk, limits=options.limits if options.limits.memory else None,
                                 task_disk_size=options.disk or self.default_disk)  # fmt: skip

    async def snapshot(self, sandbox: QemuSandbox, directory: str) -> QemuSnapshot:
        """Pause ``sandbox`` and save it; the VM is gone afterwards, its disk frozen into the snapshot."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        state = os.path.join(directory, "state")
        qmp = await sandbox.qmp()
        try:
            await qmp.execute("stop")
            await qmp.execute("migrate", uri=f"exec:cat > {state}")
            with trio.fail_after(120):
                while True:
                    info = await qmp.execute("query-migrate")
                    if info.get("status") == "completed":
                        break
                    if info.get("status") in ("failed", "cancelled"):
                        raise SandboxError(f"snapshot failed: {info}")
                    await trio.sleep(0.02)
            try:
                await qmp.execute("quit")
            except SandboxError:
                pass
        finally:
            await qmp.aclose()
        with trio.move_on_after(10):
            await sandbox._proc.wait()
        disk = os.path.join(directory, "disk.qcow2")
        os.replace(os.path.join(sandbox.run_dir, "disk.qcow2"), disk)
        await sandbox.destroy()
        return QemuSnapshot(state, disk, directory, sandbox.task_disk_size)

    async def restore(self, task_id: str, run_dir: str, snap: QemuSnapshot) -> QemuSandbox:
        """A new VM from ``snap``: its own overlay on the frozen disk, memory from the state file."""
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        disk = os.path.join(run_dir, "disk.qcow2")
        await self._overlay(disk, snap.disk, "qcow2")
        sb = await self._start(task_id, run_dir, disk, incoming=f"exec:cat {snap.state}",
                               task_disk_size=snap.task_disk_size)  # fmt: skip
        try:
            qmp = await sb.qmp()
            try:
                with trio.fail_after(60):
                    while True:
                        status = (await qmp.execute("query-status"))["status"]
                        if status == "running":
                            break
                        if status in ("paused", "postmigrate", "prelaunch"):
                            await qmp.execute("cont")
                            break
                        if status != "inmigrate":
                            raise SandboxError(f"restore: unexpected VM status {status}")
                        await trio.sleep(0.005)
            finally:
                await qmp.aclose()
        except (SandboxError, trio.TooSlowError, OSError) as exc:
            diag = sb.diagnostics()
            await sb.destroy()
            raise SandboxError(f"restore failed: {exc}; {diag[-500:]}") from None
        except BaseException:  # cancelled: the VM must not outlive us
            await sb.destroy()
            raise
        return sb

    async def aclose(self) -> None:
        pass


async def reap_leftovers(root: str) -> list[str]:
    """At node start: kill QEMUs a crashed node left running under ``root`` and remove their dirs."""
    removed: list[str] = []
    if not os.path.isdir(root):
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        if "vm.json" not in filenames:
            continue
        try:
            with open(os.path.join(dirpath, "vm.json")) as f:
                pid = int(json.load(f)["pid"])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = os.path.join(dirpath, "qmp.sock").encode() in f.read()
        except (OSError, ValueError, KeyError):
            mine = False
        if mine:
            await kill_tree(pid)
        removed.append(dirpath)
        dirnames.clear()
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed
