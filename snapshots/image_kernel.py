"""Guest kernel and initramfs: Debian's cloud kernel, its ELF vmlinux, a busybox initramfs.

The cloud kernel builds virtio, virtio-mmio and vsock as modules (ext4, jbd2, crc32c are
built in), so the initramfs carries those modules, resolved through each module's
`depends=` modinfo, and loads them before mounting the root disk.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import struct
import subprocess
import tempfile
from pathlib import Path

from image_common import (
    KERNEL_DEB_SHA256,
    KERNEL_PACKAGE,
    KERNEL_RELEASE,
    KERNEL_VERSION,
    REPO,
    SOURCE_DATE_EPOCH,
    log,
    rmtree,
    run,
    sha256_file,
)

# What the initramfs loads (dependencies are added and ordered automatically).
MODULES = [
    "virtio_mmio",  # device discovery on microvm / Firecracker (ACPI or virtio_mmio.device=)
    "virtio_pci",  # q35/pc machines, harmless elsewhere
    "virtio_blk",
    "virtio_net",
    "virtio_console",  # virtio-serial channels when there is no vsock
    "virtio_rng",  # entropy for a fast crng init when the VMM offers it
    "vsock",
    "vmw_vsock_virtio_transport",
]


def fetch_kernel_deb(downloads: Path) -> Path:
    """The pinned kernel .deb, downloaded once with apt-get and checked against its sha256."""
    downloads.mkdir(parents=True, exist_ok=True)
    deb = downloads / f"{KERNEL_PACKAGE}_{KERNEL_VERSION}_amd64.deb"
    if deb.exists() and sha256_file(deb) == KERNEL_DEB_SHA256:
        return deb
    spec = f"{KERNEL_PACKAGE}={KERNEL_VERSION}"
    for attempt in (1, 2):
        result = run(["apt-get", "download", spec], cwd=downloads, check=False, stderr=subprocess.PIPE, text=True)
        if result.returncode == 0 and deb.exists():
            break
        if attempt == 1:
            log("apt-get download failed; running apt-get update and retrying")
            run(["apt-get", "update", "-qq"])
    else:
        raise SystemExit(
            f"cannot download {spec}: {result.stderr.strip()}\n"
            "The Debian archive only keeps the newest kernel: bump KERNEL_* in snapshots/image_common.py"
        )
    got = sha256_file(deb)
    if got != KERNEL_DEB_SHA256:
        deb.unlink()
        raise SystemExit(f"{deb.name}: sha256 {got} != pinned {KERNEL_DEB_SHA256}")
    return deb


def extract_deb(deb: Path, dest: Path) -> Path:
    """dpkg-deb -x into dest (cached: the kernel package never changes for a pinned version)."""
    done = dest / ".extracted"
    if done.exists():
        return dest
    rmtree(dest)
    dest.mkdir(parents=True)
    run(["dpkg-deb", "-x", deb, dest])
    done.write_text(KERNEL_VERSION + "\n")
    return dest


def kernel_config(root: Path) -> dict[str, str]:
    config = {}
    for line in (root / f"boot/config-{KERNEL_RELEASE}").read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            config[key] = value
    return config


# ---- vmlinux from bzImage ------------------------------------------------------


def _elf_end(data: bytes) -> int:
    """Size of a 64-bit ELF image given its header (end of the section header table)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 image")
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 0x36)
    end = max(e_shoff + e_shentsize * e_shnum, e_phoff + e_phentsize * e_phnum)
    for i in range(e_phnum):
        p_offset, _va, _pa, p_filesz = struct.unpack_from("<QQQQ", data, e_phoff + i * e_phentsize + 8)
        end = max(end, p_offset + p_filesz)
    return end


def _decompress(payload: bytes) -> bytes | None:
    if payload.startswith(b"\x02\x21\x4c\x18"):  # LZ4 legacy frame (CONFIG_KERNEL_LZ4)
        # lz4 stops with an error at the trailing size word / padding; the output is complete.
        out = subprocess.run(["lz4", "-dc"], input=payload, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        return out or None
    if payload.startswith(b"\x1f\x8b"):
        try:
            return gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
        except (EOFError, OSError):
            return None
    if payload.startswith(b"\xfd7zXZ\x00"):
        try:
            return lzma.LZMADecompressor().decompress(payload)
        except lzma.LZMAError:
            return None
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        return (
            subprocess.run(["zstd", "-dc"], input=payload, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
            or None
        )
    return None


def extract_vmlinux(vmlinuz: Path) -> bytes:
    """The ELF vmlinux inside a bzImage (like scripts/extract-vmlinux).

    Uses the boot protocol's payload_offset/payload_length (2.08+) and falls back to
    scanning for compression magics."""
    data = vmlinuz.read_bytes()
    candidates = []
    if data[0x202:0x206] == b"HdrS":
        setup_sects = data[0x1F1] or 4
        payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
        start = (setup_sects + 1) * 512 + payload_offset
        candidates.append(data[start : start + payload_length])
    for magic in (b"\x02\x21\x4c\x18", b"\x1f\x8b\x08", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"):
        pos = data.find(magic)
        while pos >= 0:
            candidates.append(data[pos:])
            pos = data.find(magic, pos + 1)
    for payload in candidates:
        out = _decompress(payload)
        if out and out.startswith(b"\x7fELF"):
            end = _elf_end(out)
            if end <= len(out):
                return out[:end]
    raise SystemExit(f"no ELF vmlinux found in {vmlinuz}")


def has_pvh_note(vmlinux: bytes) -> bool:
    """True when the ELF carries XEN_ELFNOTE_PHYS32_ENTRY (PVH boot, used by QEMU -kernel)."""
    e_shoff = struct.unpack_from("<Q", vmlinux, 0x28)[0]
    e_shentsize, e_shnum = struct.unpack_from("<HH", vmlinux, 0x3A)
    for i in range(e_shnum):
        sh = e_shoff + i * e_shentsize
        sh_type = struct.unpack_from("<I", vmlinux, sh + 4)[0]
        if sh_type != 7:  # SHT_NOTE
            continue
        off, size = struct.unpack_from("<QQ", vmlinux, sh + 0x18)
        pos = off
        while pos + 12 <= off + size:
            namesz, descsz, ntype = struct.unpack_from("<III", vmlinux, pos)
            name = vmlinux[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


# ---- modules ------------------------------------------------------------------


def _modinfo(ko: Path) -> dict[str, list[str]]:
    """Fields of a module's .modinfo ELF section."""
    data = ko.read_bytes()
    e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        sh = e_shoff + i * e_shentsize
        name = struct.unpack_from("<I", data, sh)[0]
        off, size = struct.unpack_from("<QQ", data, sh + 0x18)
        return name, off, size

    _, stroff, _ = section(e_shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(e_shnum):
        name, off, size = section(i)
        if data[stroff + name : data.index(b"\0", stroff + name)] == b".modinfo":
            for field in data[off : off + size].split(b"\0"):
                if b"=" in field:
                    key, value = field.decode(errors="replace").split("=", 1)
                    info.setdefault(key, []).append(value)
    return info


def resolve_modules(moddir: Path, wanted: list[str]) -> list[str]:
    """Paths (relative to moddir) of wanted modules and their dependencies, dependencies first."""
    by_name = {}
    for ko in moddir.rglob("*.ko"):
        by_name[ko.stem.replace("-", "_")] = ko
    ordered: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name not in by_name:
            builtin = (moddir / "modules.builtin").read_text()
            if f"/{name}.ko" in builtin.replace("-", "_"):
                return  # built into the kernel
            raise SystemExit(f"module {name} not found (needed by {' <- '.join(chain) or 'the image'})")
        seen.add(name)
        ko = by_name[name]
        for deps in _modinfo(ko).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep, chain + (name,))
        ordered.append(str(ko.relative_to(moddir)))

    for name in wanted:
        visit(name, ())
    return ordered


# ---- initramfs -------------------------------------------------------------------


class Cpio:
    """A deterministic newc archive: fixed mtime, uid/gid 0, sequential inode numbers."""

    def __init__(self, mtime: int) -> None:
        self.buf = io.BytesIO()
        self.mtime = mtime
        self.ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        fields = [self.ino, mode, 0, 0, nlink, self.mtime, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, 0o040000 | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120000 | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def build_initramfs(kernel_root: Path, busybox: Path, init_script: Path) -> tuple[bytes, list[str]]:
    moddir = kernel_root / "lib/modules" / KERNEL_RELEASE
    modules = resolve_modules(moddir, MODULES)
    cpio = Cpio(SOURCE_DATE_EPOCH)
    dirs = {".", "bin", "dev", "etc", "lib", "newroot", "proc", "sbin", "sys", "lib/modules"}
    for rel in modules:
        parent = Path(rel).parent
        while str(parent) != ".":
            dirs.add(f"lib/modules/{parent}")
            parent = parent.parent
    for d in sorted(dirs):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init_script.read_bytes(), 0o755)
    cpio.file("etc/modules.list", "".join(m + "\n" for m in modules).encode())
    for rel in modules:
        cpio.file(f"lib/modules/{rel}", (moddir / rel).read_bytes())
    raw = cpio.finish()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        gz.write(raw)
    return out.getvalue(), modules


def build_kernel(cache: Path, out: Path) -> dict:
    """Write vmlinux, vmlinuz and initramfs.cpio.gz into out; return the manifest part."""
    deb = fetch_kernel_deb(cache / "downloads")
    root = extract_deb(deb, cache / "kernel" / f"{KERNEL_PACKAGE}_{KERNEL_VERSION}")
    vmlinuz = root / f"boot/vmlinuz-{KERNEL_RELEASE}"
    vmlinux = extract_vmlinux(vmlinuz)
    (out / "vmlinux").write_bytes(vmlinux)
    (out / "vmlinuz").write_bytes(vmlinuz.read_bytes())
    initramfs, modules = build_initramfs(root, Path("/bin/busybox"), REPO / "guest/initramfs-init")
    (out / "initramfs.cpio.gz").write_bytes(initramfs)
    for name in ("vmlinux", "vmlinuz", "initramfs.cpio.gz"):
        os.utime(out / name, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    config = kernel_config(root)
    return {
        "package": KERNEL_PACKAGE,
        "version": KERNEL_VERSION,
        "release": KERNEL_RELEASE,
        "deb_sha256": KERNEL_DEB_SHA256,
        "hz": int(config.get("CONFIG_HZ", "250")),
        "pvh_note": has_pvh_note(vmlinux),
        "virtio_mmio_cmdline_devices": config.get("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES") == "y",
        "initramfs_modules": modules,
    }


if __name__ == "__main__":  # manual use: python3 snapshots/image_kernel.py OUTDIR
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    target.mkdir(parents=True, exist_ok=True)
    print(build_kernel(REPO / ".cache/image", target))
