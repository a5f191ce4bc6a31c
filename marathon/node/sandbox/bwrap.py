"""The bubblewrap profile of the ``process`` sandbox: a pure function from what the sandbox
should see to bwrap's argv.

What a sandbox sees (DESIGN.md, isolation model):
- a new root (tmpfs, read-only once built) with the host's ``/usr`` (and the ``/bin``,
  ``/lib``… links or directories) read-only; nothing of the host's ``/home``, ``/root``,
  ``/opt``, ``/srv``, ``/var`` or ``/run``;
- its own ``/etc``: generated ``passwd``/``group`` (root, the sandbox user, nobody), ``hosts``,
  ``hostname``, ``resolv.conf``, ``nsswitch.conf``; from the host only what programs need to
  run (the dynamic linker's cache, Debian's alternatives links, CA certificates, time zone…);
  never the host's ``environment``, ``gitconfig``, ``ssl/private``, ``passwd`` or ``shadow``;
- the runtime the agent needs, read-only at its own path (the marathon executable, or the
  interpreter and package in a development checkout), and Claude Code's binary at ``/opt/claude/claude``
  (``/opt`` is the sandbox's own);
- writable only: ``/workspace``, ``HOME`` (``/home/marathon``), ``/tmp`` and (root nodes) the
  agent's own ``/run/marathon`` — on the task's capped disk, or size-limited tmpfs;
- own mount, pid, network (loopback only), ipc, uts (and, on nodes that are not root, user)
  namespaces; the seccomp filter (``marathon.node.seccomp``); on root nodes only the few
  capabilities the agent needs to drop to the sandbox user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

IN_WORKSPACE = "/workspace"
IN_HOME = "/home/marathon"
IN_AGENT = "/run/marathon"
IN_CLAUDE = "/opt/claude/claude"
SANDBOX_USER = "marathon"
SYSTEM = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
# what programs need of the host's /etc; everything else is the sandbox's own or absent
ETC_FROM_HOST = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "ssl/certs", "ssl/openssl.cnf",
    "ca-certificates", "localtime", "timezone", "os-release", "debian_version", "protocols", "services",
    "shells", "profile", "bash.bashrc", "inputrc", "terminfo", "mime.types", "magic", "magic.mime",
    "manpath.config", "mke2fs.conf", "gai.conf", "host.conf", "networks", "ethertypes", "xattr.conf",
    "locale.alias", "papersize", "python3", "python3.11", "perl", "vim", "nanorc", "ssh/ssh_config",
)  # fmt: skip
CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL", "CAP_FOWNER", "CAP_DAC_OVERRIDE")


def etc_files(uid: int, gid: int) -> dict[str, str]:
    """The generated part of the sandbox's /etc."""
    return {
        "passwd": (
            "root:x:0:0:root:/root:/bin/sh\n"
            f"{SANDBOX_USER}:x:{uid}:{gid}:Marathon sandbox:{IN_HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\n{SANDBOX_USER}:x:{gid}:\nnogroup:x:65534:\n",
        "hosts": "127.0.0.1\tlocalhost marathon-sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "hostname": "marathon-sandbox\n",
        "resolv.conf": "# no network in the sandbox\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\nnetworks: files\n",
    }


def write_etc(directory: str, uid: int, gid: int) -> str:
    os.makedirs(directory, mode=0o755, exist_ok=True)
    for name, text in etc_files(uid, gid).items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(directory, name), 0o644)
    return directory


def _parents(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass
class Profile:
    uid: int
    gid: int
    as_root: bool  # the node is root: no user namespace, capabilities dropped to CAPS
    etc_dir: str  # the generated /etc files (write_etc)
    runtime: list[str] = field(default_factory=list)  # host paths bound read-only at the same path
    claude: str = ""  # host path of the Claude Code binary (bound at IN_CLAUDE)
    # the task's disk: host directories (loop-mounted disk), or None for size-limited tmpfs
    workspace: str | None = None
    home: str | None = None
    tmp: str | None = None
    agent_dir: str | None = None
    tmpfs_size: int | None = None  # /workspace's tmpfs when the directories above are None
    tmpfs_small: int | None = None  # HOME's and /tmp's
    seccomp_fd: int | None = None
    host_root: str = "/"  # for tests: where the host's /usr, /etc… are looked up


def argv(p: Profile) -> list[str]:
    args = [
        "bwrap", "--die-with-parent", "--new-session",
        "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "marathon-sandbox",
    ]  # fmt: skip
    if not p.as_root:
        args += ["--unshare-user", "--disable-userns", "--uid", str(p.uid), "--gid", str(p.gid)]
    host = p.host_root.rstrip("/")
    for top in SYSTEM:
        path = host + "/" + top
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), "/" + top]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, "/" + top]
    args += ["--dev", "/dev", "--proc", "/proc", "--perms", "0755", "--dir", "/etc"]
    for name in ETC_FROM_HOST:
        path = f"{host}/etc/{name}"
        if os.path.islink(path):
            for parent in _parents("/etc/" + name)[1:]:
                args += ["--perms", "0755", "--dir", parent]
            args += ["--symlink", os.readlink(path), "/etc/" + name]
        elif os.path.exists(path):
            args += ["--ro-bind", path, "/etc/" + name]
    for name in sorted(etc_files(p.uid, p.gid)):
        args += ["--ro-bind", os.path.join(p.etc_dir, name), "/etc/" + name]
    made = {"/", "/etc", "/dev", "/proc"}

    def mkdirs(path: str) -> None:
        for parent in _parents(path):
            if parent not in made:
                args.extend(["--perms", "0755", "--dir", parent])
                made.add(parent)

    if p.claude:
        mkdirs(IN_CLAUDE)
        args += ["--ro-bind", p.claude, IN_CLAUDE]
    # /dev/shm: bwrap's /dev is a tmpfs of half the host's RAM; give shared memory its own small one
    args += ["--size", str(64 * 1024 * 1024), "--perms", "1777", "--tmpfs", "/dev/shm"]
    mkdirs(IN_HOME)
    mkdirs(IN_AGENT)
    writable = ((IN_WORKSPACE, p.workspace, "0755"), (IN_HOME, p.home, "0700"), ("/tmp", p.tmp, "1777"))
    for inside, outside, perms in writable:
        if outside is not None:
            args += ["--perms", perms, "--dir", inside, "--bind", outside, inside]
        else:
            size = p.tmpfs_size if inside == IN_WORKSPACE else p.tmpfs_small
            if size:
                args += ["--size", str(size)]
            args += ["--perms", perms, "--tmpfs", inside]
    # after the writable mounts, so a checkout under /tmp (a CI clone) is not hidden by /tmp's
    bound: list[str] = []
    for path in sorted(set(p.runtime)):
        if not os.path.exists(path) or path.split("/")[1] in SYSTEM + ("etc",):
            continue
        if any(path.startswith(b.rstrip("/") + "/") for b in bound):
            continue  # already visible through a bound parent
        bound.append(path)
        mkdirs(path)
        args += ["--ro-bind", path, path]
    if p.as_root and p.agent_dir is not None:
        args += ["--perms", "0700", "--dir", IN_AGENT, "--bind", p.agent_dir, IN_AGENT]
    args += ["--dir", "/var", "--symlink", "../tmp", "/var/tmp", "--remount-ro", "/", "--chdir", IN_WORKSPACE]
    if p.as_root:
        args += ["--cap-drop", "ALL"]
        for cap in CAPS:
            args += ["--cap-add", cap]
    if p.seccomp_fd is not None:
        args += ["--seccomp", str(p.seccomp_fd)]
    return args
