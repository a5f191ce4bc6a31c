"""A task's writable space, capped: workspace + HOME + TMPDIR (+ the agent's own files).

- ``loop`` (root nodes): a sparse file formatted ext4 and loop-mounted (``nosuid,nodev``): a
  task that fills it gets ENOSPC inside its own file system while the node's data dir and the
  orchestrator's database are untouched.  5 % is reserved for root, so the agent (root in the
  sandbox) can still write the task's result bundle when the task filled the disk.  Making it
  costs ~30 ms (mkfs without a journal, lazy inode tables) and nothing is written until used.
- ``tmpfs`` (nodes that are not root, which cannot mount): size-limited tmpfs mounts made by
  bubblewrap inside the sandbox (memory-backed, so also counted by the memory limit).
- ``none``: no cap (``disk = off``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess

import trio

from marathon.errors import SandboxError

log = logging.getLogger("marathon.disk")
SUBDIRS = ("workspace", "home", "tmp", "agent")
MIN_DISK = 16 * 1024 * 1024


def loop_problem() -> str | None:
    """None when this node can make loop-mounted task disks, else why not."""
    if os.geteuid() != 0:
        return "the node is not root (cannot mount); tasks get size-limited tmpfs instead"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (e2fsprogs / mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (the loop driver is not available)"
    return None


async def _run(*argv: str, timeout: float = 60.0) -> None:
    with trio.move_on_after(timeout) as scope:
        res = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    if scope.cancelled_caught:
        raise SandboxError(f"{argv[0]} timed out after {timeout:.0f}s")
    if res.returncode != 0:
        raise SandboxError(f"{argv[0]} failed: {res.stderr.decode(errors='replace').strip()[-300:]}")


async def make_image(path: str, size: int) -> None:
    """A sparse file of ``size`` bytes holding an empty ext4 file system (no root needed: it is
    not mounted here; a VM guest mounts it as its task disk)."""
    if size < MIN_DISK:
        raise SandboxError(f"disk limit {size} bytes is below the minimum of {MIN_DISK}")
    with open(path, "wb") as f:
        f.truncate(size)
    await _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "5", "-E",
               "lazy_itable_init=1,root_owner=0:0", "-L", "marathon-task", path)  # fmt: skip


class TaskDisk:
    """The task's disk at ``<root>/disk`` (mounted) with ``workspace``, ``home``, ``tmp`` and
    ``agent`` (root-only) directories."""

    def __init__(self, root: str, size: int, uid: int, gid: int):
        self.root, self.size, self.uid, self.gid = root, size, uid, gid
        self.image = os.path.join(root, "disk.img")
        self.mountpoint = os.path.join(root, "disk")
        self.mounted = False

    def path(self, name: str) -> str:
        return os.path.join(self.mountpoint, name)

    async def create(self) -> None:
        os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)
        await make_image(self.image, self.size)
        try:
            await _run("mount", "-o", "loop,nosuid,nodev,noatime,noinit_itable", self.image, self.mountpoint)
            self.mounted = True
            os.chmod(self.mountpoint, 0o755)
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(os.path.join(self.mountpoint, "lost+found"))
            for name in SUBDIRS:
                d = self.path(name)
                os.mkdir(d, 0o700)
                if name != "agent":
                    os.chown(d, self.uid, self.gid)
            os.chmod(self.path("workspace"), 0o755)
        except BaseException:
            await self.destroy()
            raise

    async def destroy(self) -> None:
        """Unmount (the loop device goes with it) and delete the image: shielded, bounded."""
        with trio.CancelScope(shield=True), trio.move_on_after(20) as scope:
            if self.mounted:
                try:
                    await _run("umount", self.mountpoint, timeout=10)
                except SandboxError as exc:
                    log.warning("task disk %s: %s; detaching it lazily", self.mountpoint, exc)
                    await trio.run_process(["umount", "-l", self.mountpoint], check=False,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                self.mounted = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.image)
        if scope.cancelled_caught:
            log.error("task disk %s: teardown hit its 20 s bound", self.mountpoint)


async def reap_mounts(under: str) -> list[str]:
    """At node start: unmount task disks a crashed node left mounted below ``under``."""
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    prefix = os.path.realpath(under).rstrip("/") + "/"
    for line in lines:
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            found.append(point)
    for point in sorted(found, key=len, reverse=True):
        await trio.run_process(["umount", "-l", point], check=False, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    return found
