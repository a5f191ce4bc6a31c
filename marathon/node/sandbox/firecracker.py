"""The ``firecracker`` backend: one Firecracker microVM per task.

- ``detect()``: can Firecracker boot the Linux guest image here, and if not, exactly why
  (no /dev/kvm; /dev/kvm from the software ``kvm_pvm`` driver with no vmx/svm; binary or
  image missing).  ``FirecrackerBackend`` refuses to construct with that reason.
- ``FirecrackerVM`` / ``open_vm`` (``fc_api``): one VMM — spawn (optionally jailed), configure,
  start, pause/resume, Full snapshot, restore into a fresh process, destroy.
- ``reap_leftovers`` (``fc_net``): at node start, remove what a crashed node left behind.

The agent in the guest listens on AF_VSOCK; the node dials ``fcvsock:<vm_dir>/vsock.sock:<port>``
(Firecracker's hybrid vsock: ``CONNECT <port>`` -> ``OK <n>``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from marathon.errors import SandboxError
from marathon.node.cgroups import Cgroups, Limits
from marathon.node.disk import make_image
from marathon.node.sandbox import SandboxInfo, SandboxOptions
from marathon.node.sandbox.detect import default_image_dir, hardware_kvm, image_problem
from marathon.node.sandbox.fc_api import (
    DEFAULT_VIEW,
    FirecrackerAPI,
    FirecrackerVM,
    Jailer,
    Snapshot,
    find_binary,
    open_vm,
)
from marathon.node.sandbox.fc_net import DEFAULT_PREFIX, reap_leftovers

__all__ = [
    "DEFAULT_BOOT_ARGS",
    "FirecrackerAPI",
    "FirecrackerBackend",
    "FirecrackerSandbox",
    "FirecrackerVM",
    "Jailer",
    "Snapshot",
    "detect",
    "find_binary",
    "open_vm",
    "reap_leftovers",
]

log = logging.getLogger("marathon.sandbox.firecracker")

VMADDR_CID_ANY = 4294967295
DEFAULT_BOOT_ARGS = (
    "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw quiet marathon.listen=vsock:{any_cid}:{port} {net}"
)


def detect(firecracker_bin: str | None = None, image_dir: str | None = None) -> tuple[bool, str]:
    """(True, what) when Firecracker can boot the Linux guest image here, else (False, every
    reason why not, joined by "; ")."""
    reasons: list[str] = []
    kvm_ok, kvm = hardware_kvm()
    if not kvm_ok:
        reasons.append(
            kvm.replace("stock Linux guests cannot run on it", "Firecracker starts but a stock Linux guest cannot run")
        )
    fc = firecracker_bin if firecracker_bin is not None else find_binary("firecracker")
    if not fc or not os.access(fc, os.X_OK):
        reasons.append(f"firecracker binary missing ({fc or 'not found'}): run make firecracker")
    image = image_dir if image_dir is not None else default_image_dir()
    problem = image_problem(image, ("vmlinux", "rootfs.ext4"))
    if problem:
        reasons.append(problem)
    if reasons:
        return False, "; ".join(reasons)
    return True, f"{kvm}, firecracker at {fc}, image at {image}"


class FirecrackerSandbox:
    """A task's microVM, as the node's supervisor sees it."""

    def __init__(self, task_id: str, vm: FirecrackerVM, agent_port: int):
        self.id = task_id
        self.vm = vm
        self.group = vm.group
        self.host_workspace: str | None = None
        self.start_fields: dict = {}
        self.agent_address = f"fcvsock:{vm.vsock_uds}:{agent_port}"
        self.workspace = "/workspace"

    def exited(self) -> int | None:
        return self.vm.exited()

    def diagnostics(self) -> str:
        return self.vm.diagnostics()

    async def destroy(self) -> None:
        await self.vm.destroy()


@dataclass
class GuestImage:
    dir: str

    @property
    def kernel(self) -> str:
        return os.path.join(self.dir, "vmlinux")

    @property
    def initrd(self) -> str:
        path = os.path.join(self.dir, "initramfs.cpio.gz")
        return path if os.path.isfile(path) else ""

    @property
    def rootfs(self) -> str:
        return os.path.join(self.dir, "rootfs.ext4")


class FirecrackerBackend:
    """Shaped like ``ProcessBackend``.  Raises ``SandboxError(detect() reason)`` when it
    cannot work here (``check=False`` skips that, for tests with a stand-in image)."""

    name = "firecracker"

    def __init__(
        self,
        *,
        firecracker_bin: str = "",
        image_dir: str = "",
        boot_args: str = DEFAULT_BOOT_ARGS,
        vcpus: int = 2,
        mem_mib: int = 1024,
        agent_port: int = 1024,
        guest_cid: int = 3,
        network: str = "tap",
        jailer: Jailer | None = None,
        prefix: str = DEFAULT_PREFIX,
        view_dir: str = DEFAULT_VIEW,
        api_timeout: float = 5.0,
        ready_timeout: float = 5.0,
        check: bool = True,
        cgroups: Cgroups | None = None,
    ):
        self.cgroups = cgroups or Cgroups(0)
        self.firecracker_bin = firecracker_bin or find_binary("firecracker")
        self.image = GuestImage(image_dir or default_image_dir())
        if check:
            ok, reason = detect(self.firecracker_bin, self.image.dir)
            if not ok:
                raise SandboxError(f"the firecracker backend cannot run here: {reason}")
        elif not self.firecracker_bin:
            raise SandboxError("firecracker binary missing: run make firecracker")
        self.boot_args, self.vcpus, self.mem_mib = boot_args, vcpus, mem_mib
        self.agent_port, self.guest_cid, self.network = agent_port, guest_cid, network
        self.vm_kwargs: dict[str, Any] = dict(
            firecracker_bin=self.firecracker_bin,
            prefix=prefix,
            jailer=jailer,
            view_dir=view_dir,
            network=network,
            api_timeout=api_timeout,
            ready_timeout=ready_timeout,
        )
        isolation = f"Firecracker microVM ({vcpus} vCPU, {mem_mib} MiB), own network namespace" + (
            ", jailer (chroot, uid, cgroups)" if jailer else ", own mount namespace"
        )
        self.info = SandboxInfo("firecracker", isolation, [])

    def _boot_args(self, vm: FirecrackerVM) -> str:
        net = vm.net.boot_args() if vm.net else ""
        return self.boot_args.format(any_cid=VMADDR_CID_ANY, port=self.agent_port, net=net).strip()

    def vmm_limits(self, limits: Limits | None) -> Limits:
        """The VMM's cgroup: the task's limits, never less memory than the guest's plus the VMM's own."""
        floor = (self.mem_mib + 128) * 1024 * 1024
        limits = limits or Limits(pids=1024, cpus=float(self.vcpus))
        return Limits(memory=max(limits.memory or 0, floor), pids=limits.pids or 1024, cpus=limits.cpus)

    def _new_vm(self, task_id: str, run_dir: str, limits: Limits | None) -> FirecrackerVM:
        vm = FirecrackerVM(os.path.join(run_dir, "vm"), **self.vm_kwargs)
        try:
            vm.group = self.cgroups.create(f"vm-{os.path.basename(run_dir)}-{task_id}", self.vmm_limits(limits))
        except OSError as exc:
            raise SandboxError(f"could not create the VM's cgroup: {exc}") from None
        return vm

    async def create(
        self, task_id: str, run_dir: str, options: SandboxOptions = SandboxOptions()
    ) -> FirecrackerSandbox:
        """Cold boot: a fresh VM with its own copy of the root disk."""
        vm = self._new_vm(task_id, run_dir, options.limits if options.limits.memory else None)
        try:
            await vm.spawn()
            drives: tuple[tuple[str, str, bool], ...] = ()
            if options.disk:  # the guest's /workspace, HOME and TMPDIR: a second disk of the task's size
                task_disk = os.path.join(run_dir, "task.img")
                await make_image(task_disk, options.disk)
                drives = (("task", task_disk, False),)
            await vm.configure(
                kernel=self.image.kernel,
                initrd=self.image.initrd,
                boot_args=self._boot_args(vm),
                rootfs=self.image.rootfs,
                vcpus=self.vcpus,
                mem_mib=self.mem_mib,
                vsock_cid=self.guest_cid,
                extra_drives=drives,
            )
            await vm.start()
        except BaseException:
            await vm.destroy()
            raise
        log.debug("firecracker sandbox %s: vm %s (pid %s)", task_id, vm.id, vm.proc.pid if vm.proc else "?")
        return FirecrackerSandbox(task_id, vm, self.agent_port)

    async def snapshot(self, sandbox: FirecrackerSandbox, directory: str) -> Snapshot:
        """The warm pool's base: pause the VM whose agent is up, write a Full snapshot, and
        end that VM (its clones restore from the snapshot, each in its own namespace)."""
        try:
            return await sandbox.vm.snapshot(directory)
        finally:
            await sandbox.destroy()

    async def restore(self, task_id: str, run_dir: str, snapshot: Snapshot | str) -> FirecrackerSandbox:
        """Warm start: a fresh VMM loading ``snapshot`` (taken with the same network mode and
        jailer setting); identity is re-injected by the caller over the agent channel."""
        snap = Snapshot.load(snapshot) if isinstance(snapshot, str) else snapshot
        vm = self._new_vm(task_id, run_dir, None)
        try:
            await vm.spawn()
            await vm.restore_from(snap, resume=True)
        except BaseException:
            await vm.destroy()
            raise
        return FirecrackerSandbox(task_id, vm, self.agent_port)

    async def aclose(self) -> None:
        pass
