#!/usr/bin/env python3
"""Build the Marathon guest image into .cache/image/<input hash>/ (`make image`).

Artefacts: vmlinux (ELF, PVH entry: QEMU -kernel and Firecracker), vmlinuz (the
Debian bzImage), initramfs.cpio.gz, rootfs.ext4, manifest.json; .cache/image/current
points at the newest build.  The input hash covers the build scripts, the guest
files, the pinned versions, the Claude Code binary, the marathon binary and the host
tools that shape the bytes; a build whose hash exists already prints "cached".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import image_common as common  # noqa: E402
from image_common import REPO, log, rmtree, sha256_file  # noqa: E402
from image_kernel import build_kernel  # noqa: E402
from image_rootfs import AGENT_DIR_EXE, build_rootfs  # noqa: E402


def sha256_tree(root: Path) -> str:
    """One digest for a directory: every file's relative path and content, in order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update((os.readlink(path).encode() if path.is_symlink() else sha256_file(path).encode()) + b"\n")
    return h.hexdigest()


FORMAT = 1
ARTEFACTS = ("vmlinux", "vmlinuz", "initramfs.cpio.gz", "rootfs.ext4")
# Files that shape the image (boot_check.py and docs do not).
INPUT_FILES = [
    "snapshots/image_common.py",
    "snapshots/image_kernel.py",
    "snapshots/image_rootfs.py",
    "snapshots/build_image.py",
    "snapshots/mke2fs.conf",
]
DEFAULT_CLAUDE = REPO / ".cache/claude-code/node_modules/@anthropic-ai/claude-code/bin/claude.exe"
PLACEHOLDER = REPO / "guest/placeholder-agent"


def claude_version(path: Path) -> str:
    text = common.output([path, "--version"], env=dict(os.environ, HOME="/tmp", DISABLE_AUTOUPDATER="1"))
    return text.split()[0] if text.strip() else ""


def input_hash(marathon_bin: Path, claude_bin: Path, claude_sha: str, headroom_mb: int) -> tuple[str, dict]:
    files = INPUT_FILES + sorted(str(p.relative_to(REPO)) for p in (REPO / "guest").rglob("*") if p.is_file())
    inputs = {
        "format": FORMAT,
        "files": {f: sha256_file(REPO / f) for f in files},
        "pins": {
            k: getattr(common, k)
            for k in (
                "SUITE",
                "MIRROR",
                "ARCH",
                "KERNEL_PACKAGE",
                "KERNEL_VERSION",
                "KERNEL_DEB_SHA256",
                "ROOTFS_PACKAGES",
                "CLAUDE_CODE_VERSION",
                "AGENT_UID",
                "SOURCE_DATE_EPOCH",
                "ROOTFS_UUID",
            )
        },
        "claude_sha256": claude_sha,
        "marathon_sha256": sha256_tree(marathon_bin) if marathon_bin.is_dir() else sha256_file(marathon_bin),
        "marathon_placeholder": marathon_bin.resolve() == PLACEHOLDER.resolve(),
        "headroom_mb": headroom_mb,
        "host": {
            "busybox_sha256": sha256_file(Path("/bin/busybox")),
            "e2fsprogs": common.host_package_version("e2fsprogs"),
            "debootstrap": common.host_package_version("debootstrap"),
        },
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:20], inputs


def point_current(cache: Path, name: str) -> None:
    tmp = cache / ".current.tmp"
    rmtree(tmp)
    tmp.symlink_to(name)
    os.replace(tmp, cache / "current")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--marathon-bin",
        default=os.environ.get("MARATHON_BIN") or "",
        help="the agent executable installed as /usr/local/bin/marathon (default: placeholder)",
    )
    ap.add_argument("--claude-bin", default=os.environ.get("CLAUDE_BIN") or str(DEFAULT_CLAUDE))
    ap.add_argument("--cache", default=str(REPO / ".cache/image"))
    ap.add_argument(
        "--headroom-mb",
        type=int,
        default=int(os.environ.get("IMAGE_HEADROOM_MB") or 2048),
        help="free space in rootfs.ext4 for the task's work (the file is sparse)",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even when cached")
    ap.add_argument(
        "--print-hash",
        action="store_true",
        help="print the input hash (e.g. a CI cache key for .cache/image/<hash>) and exit",
    )
    args = ap.parse_args()

    if not args.print_hash:
        if os.geteuid() != 0:
            sys.exit("make image needs root (debootstrap, device nodes and file owners in the rootfs)")
        common.ensure_host_packages(list(common.HOST_PACKAGES))
    cache = Path(args.cache).resolve()
    marathon_bin = Path(args.marathon_bin).resolve() if args.marathon_bin else PLACEHOLDER
    claude_bin = Path(args.claude_bin).resolve()
    for what, path in (("marathon", marathon_bin), ("claude", claude_bin)):
        if what == "marathon" and path.is_dir():  # a one-folder build
            path = path / AGENT_DIR_EXE
        if not path.is_file() or not os.access(path, os.X_OK):
            hint = " (run `make claude-code`)" if what == "claude" else ""
            sys.exit(f"{what} executable not found: {path}{hint}")
    cversion = claude_version(claude_bin)
    if cversion != common.CLAUDE_CODE_VERSION:
        sys.exit(f"{claude_bin} is Claude Code {cversion!r}, the image pins {common.CLAUDE_CODE_VERSION}")

    started = time.monotonic()
    claude_sha = sha256_file(claude_bin)
    digest, inputs = input_hash(marathon_bin, claude_bin, claude_sha, args.headroom_mb)
    if args.print_hash:
        print(digest)
        return 0
    out = cache / digest
    complete = all((out / name).is_file() for name in (*ARTEFACTS, "manifest.json"))
    if complete and not args.force:
        point_current(cache, digest)
        print(f"cached: {out}")
        return 0

    log(f"building image {digest}")
    tmp = cache / f"{digest}.tmp"
    rmtree(tmp)
    tmp.mkdir(parents=True)
    kernel = build_kernel(cache, tmp)
    log(f"kernel {kernel['release']} ({kernel['version']}), initramfs with {len(kernel['initramfs_modules'])} modules")
    image_json = {
        "input_hash": digest,
        "kernel": kernel["release"],
        "claude_code": cversion,
        "marathon_sha256": inputs["marathon_sha256"],
        "placeholder_agent": inputs["marathon_placeholder"],
    }
    rootfs = build_rootfs(
        cache,
        cache / "staging" / digest,
        tmp,
        marathon_bin=marathon_bin,
        claude_bin=claude_bin,
        headroom_mb=args.headroom_mb,
        image_json=image_json,
    )
    log("hashing artefacts")
    artefacts = {}
    for name in ARTEFACTS:
        path = tmp / name
        artefacts[name] = {
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
            "allocated": path.stat().st_blocks * 512,
        }
    manifest = {
        "format": FORMAT,
        "input_hash": digest,
        "inputs": inputs,
        "kernel": kernel,
        "cmdline": common.BASE_CMDLINE,
        "rootfs": {
            "suite": common.SUITE,
            "uuid": common.ROOTFS_UUID,
            "label": common.ROOTFS_LABEL,
            "size_bytes": rootfs["size_bytes"],
            "content_bytes": rootfs["content_bytes"],
            "inodes": rootfs["inodes"],
            "agent_user": {"name": common.AGENT_USER, "uid": common.AGENT_UID},
            "packages": rootfs["packages"],
        },
        "claude_code": {"version": cversion, "sha256": claude_sha, "path": "/usr/local/bin/claude"},
        "marathon": {
            "sha256": inputs["marathon_sha256"],
            "placeholder": inputs["marathon_placeholder"],
            "source": str(marathon_bin),
            "path": "/usr/local/bin/marathon",
        },
        "artefacts": artefacts,
        "source_date_epoch": common.SOURCE_DATE_EPOCH,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    rmtree(out)
    os.rename(tmp, out)
    point_current(cache, digest)
    log(f"built {out} in {manifest['build_seconds']} s")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
