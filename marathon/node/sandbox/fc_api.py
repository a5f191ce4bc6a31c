"""One Firecracker VMM: its REST API over the Unix socket (httpx over UDS, under trio) and
the process, disks, snapshots and jail that belong to it.

Every API call has an explicit timeout; transport failures and API faults become
``SandboxError`` carrying Firecracker's own ``fault_message``.

Paths the VMM records in a snapshot (the disk, the vsock socket, the TAP name) must be valid
in every clone restored from it, yet distinct per clone.  So each VMM runs either
- in a mount namespace of its own (``unshare -m``) where its directory is bind-mounted at a
  fixed path (``view_dir``): every clone sees ``/run/marathon-fc/vm/vsock.sock`` while the
  host sees ``<vm_dir>/vsock.sock``; or
- under the jailer, whose chroot has the same effect (``/vsock.sock`` in each jail);
and in a network namespace of its own holding ``tap0`` (``fc_net``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from marathon.errors import SandboxError
from marathon.node.cgroups import Group
from marathon.node.procs import kill_tree
from marathon.node.spawn import Child, spawn
from marathon.node.sandbox.fc_net import (
    CLEANUP_TIMEOUT,
    DEFAULT_PREFIX,
    MARKER,
    VMNet,
    cgroup_version,
    cleanup_vm_dir,
    setup_net,
)

log = logging.getLogger("marathon.sandbox.firecracker")

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_VIEW = "/run/marathon-fc/vm"  # where each VMM sees its own directory (mount namespace)
_NS_SCRIPT = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


def find_binary(name: str) -> str:
    """``$MARATHON_FIRECRACKER_DIR/<name>``, else ``.cache/firecracker/<name>`` in the source
    tree (``make firecracker``), else ``<name>`` on PATH; "" when none exists."""
    for d in (os.environ.get("MARATHON_FIRECRACKER_DIR", ""), str(REPO_ROOT / ".cache" / "firecracker")):
        if d and os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return shutil.which(name) or ""


class FirecrackerAPI:
    """One VMM's API.  ``timeout`` bounds each request (connect + read + write)."""

    def __init__(self, sock_path: str, *, timeout: float = 5.0):
        self.sock_path = sock_path
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=sock_path, retries=0),
            base_url="http://localhost",
            timeout=httpx.Timeout(timeout),
        )

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        t = self.timeout if timeout is None else timeout
        try:
            with trio.fail_after(t + 1):  # belt and braces over httpx's own timeouts
                resp = await self._client.request(
                    method,
                    path,
                    json=body,
                    timeout=httpx.Timeout(t),
                    headers={"Accept": "application/json"},
                )
        except trio.TooSlowError:
            raise SandboxError(f"firecracker API {method} {path}: no answer within {t:.1f}s") from None
        except httpx.TimeoutException:
            raise SandboxError(f"firecracker API {method} {path}: no answer within {t:.1f}s") from None
        except httpx.HTTPError as exc:
            raise SandboxError(f"firecracker API {method} {path}: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 300:
            raise SandboxError(f"firecracker API {method} {path} -> {resp.status_code}: {fault_message(resp.content)}")
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    async def put(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        return await self.request("PUT", path, body, timeout=timeout)

    async def patch(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        return await self.request("PATCH", path, body, timeout=timeout)

    async def get(self, path: str, *, timeout: float | None = None) -> Any:
        return await self.request("GET", path, timeout=timeout)

    async def wait_ready(self, deadline: float, *, died: Callable[[], str | None]) -> dict[str, Any]:
        """Poll until the API answers ``GET /`` (instance info), the process dies (``died()``
        returns a reason) or the trio-clock ``deadline`` passes."""
        delay = 0.001
        last = "the API socket does not exist yet"
        while True:
            reason = died()
            if reason:
                raise SandboxError(f"firecracker exited before its API was up: {reason}")
            if os.path.exists(self.sock_path):
                try:
                    return await self.get("/", timeout=max(0.05, min(1.0, deadline - trio.current_time())))
                except SandboxError as exc:
                    last = str(exc)
            if trio.current_time() >= deadline:
                raise SandboxError(f"firecracker API not ready in time ({self.sock_path}): {last}")
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self._client.aclose()


def fault_message(content: bytes) -> str:
    """Firecracker answers errors with ``{"fault_message": "..."}``."""
    try:
        doc = json.loads(content)
    except ValueError:
        return content.decode(errors="replace").strip()[:500] or "(empty body)"
    if isinstance(doc, dict) and "fault_message" in doc:
        return str(doc["fault_message"])
    return json.dumps(doc)[:500]


@dataclass
class Jailer:
    """Run the VMM under Firecracker's jailer (chroot, uid/gid, cgroups)."""

    binary: str
    uid: int
    gid: int
    chroot_base: str = "/srv/jailer"  # short: the API socket path in the jail must fit AF_UNIX
    cgroups: tuple[str, ...] = ()  # e.g. ("cpu.shares=512", "memory.limit_in_bytes=1073741824")
    cgroup_version: int = 0  # 0: 2 when only the unified hierarchy is mounted, else 1
    parent_cgroup: str = "firecracker"
    resource_limits: tuple[str, ...] = ()  # e.g. ("no-file=1024",)


@dataclass
class Snapshot:
    """A Full snapshot in ``dir``: VM state, guest memory, and the disks as they were."""

    dir: str
    layout: str  # "/run/marathon-fc/vm" (mount-namespace view) or "/" (jail)
    state: str = "vm.state"
    mem: str = "vm.mem"
    disks: list[str] = field(default_factory=list)  # file names, same in the VM and here
    vsock: str = ""  # file name of the vsock socket in the VM's view, "" without vsock
    net: bool = False

    def save(self) -> None:
        with open(os.path.join(self.dir, "snapshot.json"), "w") as f:
            json.dump(asdict(self), f, indent=1)

    @classmethod
    def load(cls, path: str) -> Snapshot:
        with open(os.path.join(path, "snapshot.json")) as f:
            doc = json.load(f)
        doc["dir"] = path
        return cls(**doc)


async def copy_file(src: str, dst: str) -> None:
    """Per-VM copy of a disk: a reflink where the filesystem can, else a sparse copy."""
    res = await trio.run_process(
        ["cp", "--reflink=auto", "--sparse=always", src, dst], capture_stderr=True, check=False
    )
    if res.returncode != 0:
        raise SandboxError(f"could not copy {src}: {res.stderr.decode(errors='replace').strip()}")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class FirecrackerVM:
    """One Firecracker process.  ``spawn()`` -> ``configure()`` -> ``start()``, or ``spawn()``
    -> ``restore_from()``; ``destroy()`` always.  ``open_vm()`` wraps this."""

    def __init__(
        self,
        vm_dir: str,
        *,
        firecracker_bin: str = "",
        vm_id: str = "",
        prefix: str = DEFAULT_PREFIX,
        jailer: Jailer | None = None,
        view_dir: str = DEFAULT_VIEW,
        network: str = "none",
        api_timeout: float = 5.0,
        ready_timeout: float = 5.0,
        log_level: str = "Warning",
    ):
        if network not in ("none", "tap", "egress"):
            raise SandboxError(f"network must be none, tap or egress, not {network!r}")
        self.vm_dir = os.path.abspath(vm_dir)
        self.firecracker_bin = firecracker_bin or find_binary("firecracker")
        if not self.firecracker_bin or not os.access(self.firecracker_bin, os.X_OK):
            raise SandboxError(
                f"firecracker binary missing ({self.firecracker_bin or 'not found'}): run make firecracker"
            )
        self.id = vm_id or prefix + secrets.token_hex(4)
        self.jailer, self.network = jailer, network
        self.api_timeout, self.ready_timeout, self.log_level = api_timeout, ready_timeout, log_level
        self.serial_log = os.path.join(self.vm_dir, "serial.log")
        if jailer:
            base = os.path.abspath(jailer.chroot_base or "/srv/jailer")
            self.jail_dir = os.path.join(base, os.path.basename(self.firecracker_bin), self.id)
            self.root, self.view = os.path.join(self.jail_dir, "root"), "/"
            self.api_sock = os.path.join(self.root, "run", "firecracker.socket")
            self.fc_log = os.path.join(self.root, "fc.log")
        else:
            self.jail_dir, self.root, self.view = "", self.vm_dir, view_dir
            self.api_sock = os.path.join(self.vm_dir, "api.sock")
            self.fc_log = os.path.join(self.vm_dir, "fc.log")
        self.net: VMNet | None = None
        self.proc: Child | None = None
        self.group: Group | None = None  # the VMM's cgroup (without a jailer, which makes its own)
        self.api: FirecrackerAPI | None = None
        self.vsock_name = ""
        self.disks: list[str] = []
        self._destroyed = False
        self._tail = ""

    # -- paths -------------------------------------------------------------------------
    def host_path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def vmm_path(self, name: str) -> str:
        return os.path.join(self.view, name)

    @property
    def vsock_uds(self) -> str:
        """The hybrid vsock socket on the host (dial ``fcvsock:<this>:<port>``)."""
        return self.host_path(self.vsock_name or "vsock.sock")

    # -- process -----------------------------------------------------------------------
    def _command(self) -> list[str]:
        fc_args = ["--log-path", self.vmm_path("fc.log") if self.jailer else self.fc_log, "--level", self.log_level]
        if self.jailer:
            j = self.jailer
            version = j.cgroup_version or cgroup_version()
            cmd = [
                j.binary,
                "--id",
                self.id,
                "--exec-file",
                self.firecracker_bin,
                "--uid",
                str(j.uid),
                "--gid",
                str(j.gid),
                "--chroot-base-dir",
                os.path.dirname(os.path.dirname(self.jail_dir)),
                "--cgroup-version",
                str(version),
                "--parent-cgroup",
                j.parent_cgroup,
            ]
            for c in j.cgroups:
                cmd += ["--cgroup", c]
            for r in j.resource_limits:
                cmd += ["--resource-limit", r]
            if self.net:
                cmd += ["--netns", self.net.netns_path]
            return cmd + ["--"] + fc_args
        cmd = ["nsenter", f"--net={self.net.netns_path}"] if self.net else []
        return (
            cmd
            + [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                _NS_SCRIPT,
                "fc-vm",
                self.vm_dir,
                self.view,
                self.firecracker_bin,
                "--api-sock",
                self.api_sock,
                "--id",
                self.id,
            ]
            + fc_args
        )

    def _write_marker(self) -> None:
        doc = {
            "id": self.id,
            "pid": self.proc.pid if self.proc else None,
            "jail_dir": self.jail_dir,
            "netns": self.net.netns if self.net else "",
            "parent_cgroup": self.jailer.parent_cgroup if self.jailer else "",
        }
        with open(os.path.join(self.vm_dir, MARKER), "w") as f:
            json.dump(doc, f)

    async def spawn(self) -> dict:
        """Start the VMM and wait (bounded) until its API answers.  Returns instance info."""
        if self.proc is not None:
            raise SandboxError("this VM was already spawned")
        os.makedirs(self.vm_dir, mode=0o700, exist_ok=True)
        for sock in (self.api_sock, self.vsock_uds):
            if len(sock) + 8 > 107:
                raise SandboxError(f"socket path too long for AF_UNIX: {sock} (use a shorter run directory)")
        self._write_marker()
        if self.network != "none":
            self.net = await setup_net(self.id, egress=self.network == "egress")
            self._write_marker()
        if self.jailer:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chown(self.root, self.jailer.uid, self.jailer.gid)
        else:
            os.makedirs(self.view, exist_ok=True)
        for stale in (self.api_sock,):
            _unlink(stale)
        open(self.fc_log, "a").close()
        if self.jailer:
            os.chown(self.fc_log, self.jailer.uid, self.jailer.gid)
        with open(self.serial_log, "wb") as out:  # one log per VMM process
            try:
                # forked on the trio thread with a parent-death signal, so the VMM dies with its node
                # (the jailer's change of uid clears it: jailed VMMs are reaped at the next start)
                enter = self.group.procs_files if self.group is not None and not self.jailer else ()
                self.proc = spawn(self._command(), env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                                  stdout=out.fileno(), stderr=out.fileno(), enter=enter, pdeathsig=True)  # fmt: skip
            except OSError as exc:
                raise SandboxError(f"could not start firecracker: {exc}") from None
        self._write_marker()
        self.api = FirecrackerAPI(self.api_sock, timeout=self.api_timeout)
        return await self.api.wait_ready(trio.current_time() + self.ready_timeout, died=self._died)

    def _died(self) -> str | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"exit status {self.proc.returncode}: {self.diagnostics()[-600:]}"

    def exited(self) -> int | None:
        if self.proc is None:
            return None
        return self.proc.poll()

    def serial(self) -> str:
        try:
            with open(self.serial_log, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return self._tail

    def diagnostics(self) -> str:
        parts = []
        for name, path in (("serial", self.serial_log), ("firecracker", self.fc_log)):
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, os.path.getsize(path) - 1500))
                    text = f.read().decode(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(f"[{name}] {text}")
        return "\n".join(parts) or self._tail

    def _api(self) -> FirecrackerAPI:
        if self.api is None or self._destroyed:
            raise SandboxError("the VM is not running (spawn it first)")
        return self.api

    # -- configuration and lifecycle ---------------------------------------------------
    async def _place(self, src: str, name: str, *, copy: bool) -> str:
        """Make ``src`` visible to the VMM as ``name``; returns the VMM's path."""
        if not copy and not self.jailer:
            return os.path.abspath(src)
        dst = self.host_path(name)
        _unlink(dst)
        if copy:
            await copy_file(src, dst)
        else:
            _link_or_copy(src, dst)
        if self.jailer:
            os.chown(dst, self.jailer.uid, self.jailer.gid)
        return self.vmm_path(name)

    async def configure(
        self,
        *,
        kernel: str,
        initrd: str = "",
        boot_args: str = "",
        rootfs: str = "",
        rootfs_copy: bool = True,
        vcpus: int = 1,
        mem_mib: int = 128,
        vsock_cid: int = 0,
        extra_drives: tuple[tuple[str, str, bool], ...] = (),
    ) -> None:
        """Boot source, machine, disks (``rootfs`` copied per VM unless ``rootfs_copy`` is
        False, then shared read-only), vsock (``vsock_cid`` > 2), and the TAP when networked.
        ``extra_drives``: (drive_id, path, read_only) attached as they are."""
        api = self._api()
        boot: dict = {"kernel_image_path": await self._place(kernel, "vmlinux", copy=False), "boot_args": boot_args}
        if initrd:
            boot["initrd_path"] = await self._place(initrd, "initrd", copy=False)
        await api.put("/boot-source", boot)
        await api.put("/machine-config", {"vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": False})
        if rootfs:
            path = await self._place(rootfs, "rootfs.ext4", copy=rootfs_copy)
            if rootfs_copy:
                self.disks.append("rootfs.ext4")
            await api.put(
                "/drives/rootfs",
                {"drive_id": "rootfs", "path_on_host": path, "is_root_device": True, "is_read_only": not rootfs_copy},
            )
        for drive_id, path, read_only in extra_drives:
            vpath = await self._place(path, f"drive-{drive_id}", copy=False)
            await api.put(
                f"/drives/{drive_id}",
                {"drive_id": drive_id, "path_on_host": vpath, "is_root_device": False, "is_read_only": read_only},
            )
        if vsock_cid:
            self.vsock_name = "vsock.sock"
            _unlink(self.vsock_uds)
            await api.put("/vsock", {"guest_cid": vsock_cid, "uds_path": self.vmm_path(self.vsock_name)})
        if self.net:
            await api.put(
                "/network-interfaces/eth0",
                {"iface_id": "eth0", "host_dev_name": self.net.tap, "guest_mac": self.net.guest_mac},
            )

    async def start(self) -> None:
        await self._api().put("/actions", {"action_type": "InstanceStart"}, timeout=max(self.api_timeout, 10))

    async def pause(self) -> None:
        await self._api().patch("/vm", {"state": "Paused"})

    async def resume(self) -> None:
        await self._api().patch("/vm", {"state": "Resumed"})

    async def state(self) -> str:
        return (await self._api().get("/"))["state"]

    async def snapshot(self, dir: str, *, timeout: float = 60.0) -> Snapshot:
        """Pause (if running) and write a Full snapshot, plus a copy of each per-VM disk,
        into ``dir``.  The VM stays paused."""
        api = self._api()
        if await self.state() == "Running":
            await self.pause()
        os.makedirs(dir, exist_ok=True)
        snap = Snapshot(
            dir=os.path.abspath(dir),
            layout=self.view,
            disks=list(self.disks),
            vsock=self.vsock_name,
            net=self.net is not None,
        )
        if self.jailer:  # the VMM can only write inside its jail
            tmp = self.host_path("snap")
            os.makedirs(tmp, exist_ok=True)
            os.chown(tmp, self.jailer.uid, self.jailer.gid)
            paths = (self.vmm_path("snap/" + snap.state), self.vmm_path("snap/" + snap.mem))
        else:
            tmp, paths = snap.dir, (os.path.join(snap.dir, snap.state), os.path.join(snap.dir, snap.mem))
        await api.put(
            "/snapshot/create",
            {"snapshot_type": "Full", "snapshot_path": paths[0], "mem_file_path": paths[1]},
            timeout=timeout,
        )
        if self.jailer:
            for name in (snap.state, snap.mem):
                shutil.move(os.path.join(tmp, name), os.path.join(snap.dir, name))
            os.rmdir(tmp)
        for disk in snap.disks:
            await copy_file(self.host_path(disk), os.path.join(snap.dir, disk))
        snap.save()
        return snap

    async def restore_from(
        self, snap: Snapshot, *, resume: bool = True, remove_stale_vsock: bool = True, timeout: float = 30.0
    ) -> None:
        """Load ``snap`` into this freshly spawned VMM (own disk copies, own vsock socket)."""
        api = self._api()
        if snap.layout != self.view:
            raise SandboxError(
                f"snapshot taken with the VMM view {snap.layout!r} cannot load into {self.view!r} "
                "(jailed and unjailed VMs do not mix)"
            )
        if snap.net and not self.net:
            raise SandboxError("the snapshot has a network interface: spawn this VM with network='tap'")
        for disk in snap.disks:
            await self._place(os.path.join(snap.dir, disk), disk, copy=True)
            self.disks.append(disk)
        self.vsock_name = snap.vsock
        if snap.vsock and remove_stale_vsock:
            _unlink(self.vsock_uds)  # Firecracker binds this path again and fails if it exists
        state = await self._place(os.path.join(snap.dir, snap.state), "snap.state", copy=False)
        mem = await self._place(os.path.join(snap.dir, snap.mem), "snap.mem", copy=False)
        await api.put(
            "/snapshot/load",
            {"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": resume},
            timeout=timeout,
        )

    async def kill(self) -> None:
        """SIGKILL the VMM and nothing else (what a crash leaves behind stays)."""
        if self.proc is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                await kill_tree(self.proc.pid)
                await self.proc.wait()

    async def destroy(self) -> None:
        """Kill the VMM; remove sockets, disk copies, jail, cgroups, network namespace and
        the VM directory.  Shielded, bounded, idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT) as scope:
            self._tail = self.diagnostics()
            if self.api is not None:
                await self.api.aclose()
            if self.proc is not None:
                left = await kill_tree(self.proc.pid)
                if left:
                    log.error("vm %s: processes %s survived SIGKILL", self.id, sorted(left))
                await self.proc.wait()
            if self.group is not None:
                await self.group.destroy()
            await cleanup_vm_dir(
                self.vm_dir,
                id=self.id,
                jail_dir=self.jail_dir,
                netns=self.net.netns if self.net else "",
                parent_cgroup=self.jailer.parent_cgroup if self.jailer else "",
            )
        if scope.cancelled_caught:
            log.error("vm %s: cleanup did not finish within %.0fs", self.id, CLEANUP_TIMEOUT)


@asynccontextmanager
async def open_vm(vm_dir: str, **kwargs):
    """``async with open_vm(dir, ...) as vm:`` a spawned VMM, destroyed on the way out."""
    vm = FirecrackerVM(vm_dir, **kwargs)
    try:
        await vm.spawn()
        yield vm
    finally:
        await vm.destroy()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
