"""Guest root filesystem: debootstrap minbase + agent files, packed with `mkfs.ext4 -d`.

No mounting: debootstrap writes a directory tree, the tree is customised in place
(users are added by editing the passwd files, not with chroot useradd), every
timestamp is set to SOURCE_DATE_EPOCH, and mke2fs copies the tree into a fresh
image file.  mke2fs copies each inode's ctime/atime from the source, which cannot
be set from user space, so a debugfs pass rewrites them afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

from image_common import (
    AGENT_UID,
    AGENT_USER,
    ARCH,
    MIRROR,
    REPO,
    ROOTFS_HASH_SEED,
    ROOTFS_LABEL,
    ROOTFS_PACKAGES,
    ROOTFS_UUID,
    SOURCE_DATE_EPOCH,
    SUITE,
    log,
    output,
    rmtree,
    run,
)

BASE_FORMAT = 1  # bump to force a new debootstrap when its recipe changes
BLOCK = 4096


def base_key() -> str:
    recipe = {
        "format": BASE_FORMAT,
        "suite": SUITE,
        "mirror": MIRROR,
        "arch": ARCH,
        "variant": "minbase",
        "include": sorted(ROOTFS_PACKAGES),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def debootstrap_base(cache: Path) -> Path:
    """The debootstrap tree, built once per recipe and kept read-only in the cache.

    Package versions are whatever the mirror serves on the day it is built, so the
    cached tree (not the recipe) is what makes later builds repeatable."""
    base = cache / "base" / base_key()
    tree = base / "rootfs"
    if (base / ".done").exists():
        return tree
    rmtree(base)
    base.mkdir(parents=True)
    tmp = base / "rootfs.tmp"
    log(f"debootstrap {SUITE} minbase (+{','.join(ROOTFS_PACKAGES)}) into {tmp}")
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--arch={ARCH}",
            f"--include={','.join(ROOTFS_PACKAGES)}",
            SUITE,
            tmp,
            MIRROR,
        ],
        stdout=subprocess.DEVNULL,
    )
    tmp.rename(tree)
    (base / ".done").write_text(SUITE + "\n")
    return tree


# ---- customisation ---------------------------------------------------------------


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(data)
    os.chmod(path, mode)


def _install(src: Path, dest: Path, mode: int = 0o755) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    shutil.copyfile(src, dest)
    os.chmod(dest, mode)


def _add_line(path: Path, name: str, line: str) -> None:
    lines = [ln for ln in path.read_text().splitlines() if ln and ln.split(":", 1)[0] != name]
    lines.append(line)
    path.write_text("\n".join(lines) + "\n")


def add_agent_user(root: Path) -> None:
    """The unprivileged user Claude Code runs as (uid/gid 4242, home /home/marathon)."""
    etc = root / "etc"
    days = SOURCE_DATE_EPOCH // 86400
    _add_line(
        etc / "passwd",
        AGENT_USER,
        f"{AGENT_USER}:x:{AGENT_UID}:{AGENT_UID}:Marathon agent:/home/{AGENT_USER}:/bin/bash",
    )
    _add_line(etc / "group", AGENT_USER, f"{AGENT_USER}:x:{AGENT_UID}:")
    _add_line(etc / "shadow", AGENT_USER, f"{AGENT_USER}:!:{days}:0:99999:7:::")
    _add_line(etc / "gshadow", AGENT_USER, f"{AGENT_USER}:!::")
    home = root / "home" / AGENT_USER
    rmtree(home)
    shutil.copytree(root / "etc/skel", home, symlinks=True)
    for d in (home / ".claude", home / "work"):
        d.mkdir(exist_ok=True)
    for path in [home, *home.rglob("*")]:
        os.lchown(path, AGENT_UID, AGENT_UID)
    os.chmod(home, 0o750)


def normalise_shadow(root: Path) -> None:
    """pwconv stamps 'last password change' with the build day: pin it."""
    days = str(SOURCE_DATE_EPOCH // 86400)
    path = root / "etc/shadow"
    lines = []
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[2]:
            fields[2] = days
        lines.append(":".join(fields))
    path.write_text("\n".join(lines) + "\n")


# Files that only describe the build (logs, caches, backups) or change on every run.
PRUNE = [
    "var/log/*",
    "var/cache/apt/*",
    "var/lib/apt/lists/*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/cache/ldconfig/aux-cache",
    "etc/machine-id",
    "var/lib/dbus/machine-id",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/lintian/*",
    "usr/share/linda/*",
    "root/.bash_history",
    "etc/ssh/ssh_host_*",
    "var/lib/systemd/random-seed",
]
KEEP_LOCALES = {"locale.alias", "en", "en_US", "C.UTF-8"}


def prune(root: Path) -> None:
    for pattern in PRUNE:
        for path in root.glob(pattern):
            rmtree(path)
    for path in (root / "usr/share/locale").glob("*"):
        if path.name not in KEEP_LOCALES:
            rmtree(path)
    for doc in (root / "usr/share/doc").glob("*"):  # keep the copyright files only
        if doc.is_dir() and not doc.is_symlink():
            for path in doc.iterdir():
                if path.name != "copyright":
                    rmtree(path)
    for name in ("log", "cache/apt/archives/partial", "lib/apt/lists/partial"):
        (root / "var" / name).mkdir(parents=True, exist_ok=True)


AGENT_DIR_EXE = "marathon-agent"  # the executable inside a one-folder build (marathon.spec)


def install_marathon(src: Path, root: Path) -> None:
    """A one-file executable goes to /usr/local/bin/marathon; a one-folder build (nothing to
    unpack at each start: seconds saved per boot under emulation) to /opt/marathon, linked."""
    dest = root / "usr/local/bin/marathon"
    if not src.is_dir():
        _install(src, dest)
        return
    target = root / "opt/marathon"
    if target.exists():
        rmtree(target)
    shutil.copytree(src, target, symlinks=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    dest.symlink_to(f"/opt/marathon/{AGENT_DIR_EXE}")


def customise(root: Path, marathon_bin: Path, claude_bin: Path) -> None:
    _write(root / "etc/hostname", "marathon\n")
    _write(root / "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tmarathon\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    _write(root / "etc/resolv.conf", "")  # no resolver unless marathon.dns= is given
    _write(root / "etc/fstab", "# the root is mounted by the initramfs; marathon-init mounts the rest\n")
    _install(REPO / "guest/init", root / "sbin/marathon-init")
    install_marathon(marathon_bin, root)
    _install(claude_bin, root / "usr/local/bin/claude")
    _write(root / "etc/marathon/image.json", "")  # filled in by build_image.py
    add_agent_user(root)
    normalise_shadow(root)
    prune(root)


def set_times(root: Path, epoch: int) -> None:
    """Every mtime/atime in the tree to epoch (children before their directory)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def package_versions(root: Path) -> dict[str, str]:
    text = output(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\n"])
    return dict(line.split("\t", 1) for line in text.splitlines() if line)


# ---- ext4 ---------------------------------------------------------------------------


def tree_usage(root: Path) -> tuple[int, int]:
    """(bytes the tree needs in 4 KiB blocks, number of inodes)."""
    blocks = inodes = 0
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ["."]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or (stat.S_ISLNK(st.st_mode) and st.st_size > 59):
                blocks += -(-st.st_size // BLOCK) or 1
    return blocks * BLOCK, inodes


def _debugfs_quote(path: str) -> str:
    if any(c in path for c in '"\n\\'):
        raise SystemExit(f"cannot pass {path!r} to debugfs")
    return f'"{path}"'


def fix_inode_times(image: Path, root: Path, epoch: int) -> None:
    """mke2fs -d copies st_ctime (and st_atime after it read the file): rewrite both."""
    script = image.with_suffix(".debugfs")
    with open(script, "w") as f:
        for dirpath, dirnames, filenames in os.walk(root):
            rel = "/" + os.path.relpath(dirpath, root) if dirpath != str(root) else "/"
            for name in [""] + sorted(dirnames + filenames):
                path = os.path.normpath(os.path.join(rel, name))
                q = _debugfs_quote(path)
                f.write(f"sif {q} ctime @{epoch}\nsif {q} atime @{epoch}\n")
        f.write(f"sif /lost+found ctime @{epoch}\nsif /lost+found atime @{epoch}\n")
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(epoch))
    result = run(
        ["debugfs", "-w", "-f", script, image], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    errors = [ln for ln in result.stderr.splitlines() if ln and not ln.startswith("debugfs ")]
    if errors:
        raise SystemExit("debugfs: " + "\n".join(errors[:5]))
    script.unlink()


def make_ext4(root: Path, image: Path, headroom_mb: int) -> dict:
    used, inodes = tree_usage(root)
    # metadata (inode tables at 256 B per inode, journal, group descriptors) + 5% slack + headroom
    size = int(used * 1.05) + inodes * 256 + (64 << 20) + (headroom_mb << 20)
    size = -(-size // (1 << 20)) << 20
    if image.exists():
        image.unlink()
    image.touch()  # an existing (empty) target: mke2fs does not announce "Creating regular file"
    env = dict(
        os.environ,
        E2FSPROGS_FAKE_TIME=str(SOURCE_DATE_EPOCH),
        SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH),
        MKE2FS_CONFIG=str(REPO / "snapshots/mke2fs.conf"),
    )
    run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-T",
            "default",
            "-b",
            str(BLOCK),
            "-I",
            "256",
            "-i",
            "16384",
            "-m",
            "0",
            "-L",
            ROOTFS_LABEL,
            "-U",
            ROOTFS_UUID,
            "-E",
            f"root_owner=0:0,hash_seed={ROOTFS_HASH_SEED},lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            "-d",
            root,
            image,
            f"{size >> 10}k",
        ],
        env=env,
    )
    fix_inode_times(image, root, SOURCE_DATE_EPOCH)
    run(["e2fsck", "-fn", image], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.utime(image, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    return {"size_bytes": size, "content_bytes": used, "inodes": inodes}


def build_rootfs(
    cache: Path, staging: Path, out: Path, *, marathon_bin: Path, claude_bin: Path, headroom_mb: int, image_json: dict
) -> dict:
    base = debootstrap_base(cache)
    rmtree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    log(f"copying the base tree to {staging}")
    run(["cp", "-a", "--reflink=auto", base, staging])
    customise(staging, marathon_bin, claude_bin)
    packages = package_versions(staging)
    _write(staging / "etc/marathon/image.json", json.dumps(image_json, indent=2, sort_keys=True) + "\n")
    set_times(staging, SOURCE_DATE_EPOCH)
    log("mkfs.ext4 -d")
    info = make_ext4(staging, out / "rootfs.ext4", headroom_mb)
    rmtree(staging)
    info["packages"] = packages
    return info
