"""File operations the agent does in the workspace, a directory the sandbox user controls.

The agent may be root (in a bubblewrap sandbox on a root node, or in a VM guest), so it never
follows a path the sandbox made: every component is opened relative to the directory before
it with ``O_NOFOLLOW`` (a symlink anywhere fails with ELOOP), only regular files are read or
replaced, and a file is written by creating a new one (``O_EXCL``) next to the old name and
renaming it over — a planted symlink, hard link, FIFO or device is replaced, never written
through.  Ownership is set on the open descriptor (``fchown``), never by path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(root: str, rel: str = "") -> int:
    """An fd of ``root/rel``, each component of ``rel`` opened without following symlinks.
    (``root`` itself is the agent's own path: the workspace mount point.)"""
    fd = os.open(root, _DIR)
    try:
        for part in [p for p in rel.split("/") if p and p != "."]:
            if part == "..":
                raise OSError(f"refusing '..' in {rel!r}")
            nxt = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(root: str, rel: str, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of a regular file, or None (missing, a symlink, not regular)."""
    d, name = os.path.split(rel)
    try:
        dfd = open_dir(root, d)
    except OSError:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(limit)


def replace_file(root: str, rel: str, data: bytes, *, uid: int | None = None, gid: int | None = None,
                 mode: int = 0o644, append: bool = False) -> None:  # fmt: skip
    """Write ``root/rel`` as a new regular file (renamed over whatever had the name), owned by
    ``uid``:``gid`` when given.  With ``append``, the old content is kept if it was a regular file."""
    d, name = os.path.split(rel)
    dfd = open_dir(root, d)
    try:
        if append:
            old = read_regular(root, rel, 16 * 1024 * 1024)
            data = (old or b"") + data
        tmp = f".{name}.marathon-{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
            if uid is not None and os.geteuid() == 0:
                os.fchown(fd, uid, gid if gid is not None else uid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


def create_private(path: str, mode: int = 0o600) -> int:
    """A new file for the agent's own output (never an existing name): an fd to write to."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
