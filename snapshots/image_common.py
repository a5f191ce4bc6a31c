"""Shared helpers and pinned inputs of the guest image build (stdlib only)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
import sys
import time
from pathlib import Path

# ---- pinned inputs (all part of the image's input hash) -------------------
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ARCH = "amd64"
# Current bookworm cloud kernel (linux-image-cloud-amd64 6.1.192-2 depends on it).
# Debian never rebuilds a (package, version): the sha256 pins the exact bytes.
KERNEL_PACKAGE = "linux-image-6.1.0-56-cloud-amd64"
KERNEL_VERSION = "6.1.192-2"
KERNEL_RELEASE = "6.1.0-56-cloud-amd64"
KERNEL_DEB_SHA256 = "e7d02b943971edcb8790e256c02cfab3bca6c3d37c1bf25392a57c71300615ee"
ROOTFS_PACKAGES = ["git", "ca-certificates", "iproute2", "procps", "tini"]
CLAUDE_CODE_VERSION = "2.1.332"
AGENT_USER = "marathon"
AGENT_UID = 4242
# Every timestamp inside the image (file times, filesystem times, cpio, gzip).
SOURCE_DATE_EPOCH = 1735689600  # 2025-01-01T00:00:00Z
# Fixed filesystem identity, so two builds of the same inputs are byte-identical.
ROOTFS_UUID = "6d617261-7468-6f6e-2d72-6f6f74667331"
ROOTFS_HASH_SEED = "6d617261-7468-6f6e-2d68-617368736565"
ROOTFS_LABEL = "marathon-root"
# Default kernel command line (the backend adds tsc/lpj, marathon.* and identity).
BASE_CMDLINE = "console=ttyS0 root=/dev/vda rw panic=-1 quiet"

HOST_PACKAGES = {  # Debian package -> a file it provides that the build needs
    "debootstrap": "/usr/sbin/debootstrap",
    "busybox-static": "/bin/busybox",
    "lz4": "/usr/bin/lz4",
    "e2fsprogs": "/sbin/mke2fs",
    "qemu-utils": "/usr/bin/qemu-img",
    "dpkg": "/usr/bin/dpkg-deb",
}

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[image {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str | os.PathLike[str]], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run([str(c) for c in cmd], **kw)


def output(cmd: Sequence[str | os.PathLike[str]], **kw) -> str:
    return run(cmd, stdout=subprocess.PIPE, text=True, **kw).stdout


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def host_package_version(pkg: str) -> str:
    try:
        return output(["dpkg-query", "-W", "-f", "${Version}", pkg], stderr=subprocess.DEVNULL)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return ""


def ensure_host_packages(names: list[str]) -> None:
    """apt-get install the host tools that are missing (CI starts from nothing)."""
    missing = [p for p in names if not host_package_version(p) or not Path(HOST_PACKAGES.get(p, "/")).exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing Debian packages: {' '.join(missing)} (install them with apt-get as root)")
    log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
