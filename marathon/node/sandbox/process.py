"""The ``process`` backend: the agent as a child process under bubblewrap.

Per task: the profile of ``bwrap.py`` (own root, own /etc, own namespaces, seccomp), the slot's
own uid, a cgroup with the task's limits (entered before bwrap execs), and a capped disk for
everything the task writes (a loop-mounted ext4 image on root nodes, size-limited tmpfs
otherwise).  The agent inherits a listening socket (``--listen fd:N``), so no host directory
is writable from inside.  bwrap is forked on the trio thread with ``--die-with-parent``: the
sandbox lives exactly as long as its task, and dies with its node.

Every process is started with an explicit, minimal environment: nothing of the node's
(the Anthropic key, GitHub tokens, the node secret, any ``MARATHON_*`` setting) reaches bwrap,
its init (PID 1 in the sandbox), the agent or Claude Code.

Without bubblewrap (``bwrap = off``, or ``auto`` on a host without it): a plain child process,
with a warning — the same environment, limits and disk, but the host's files are visible.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys

import trio

from marathon.errors import ConfigError, SandboxError
from marathon.node import seccomp
from marathon.node.cgroups import Cgroups, Group
from marathon.node.disk import TaskDisk, loop_problem
from marathon.node.procs import kill_tree
from marathon.node.sandbox import SandboxInfo, SandboxOptions
from marathon.node.sandbox.bwrap import IN_AGENT, IN_CLAUDE, IN_HOME, IN_WORKSPACE, Profile, argv, write_etc
from marathon.node.spawn import Child, spawn

log = logging.getLogger("marathon.sandbox")
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


def agent_command() -> list[str]:
    """How to start this same program as an agent."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "marathon"]


def runtime_paths() -> list[str]:
    """What the agent needs to see of the host to run: the one-file executable (or the
    one-folder build), or in a checkout the interpreter, its prefixes and the package."""
    paths = [sys.executable]
    if getattr(sys, "frozen", False):
        bundle = getattr(sys, "_MEIPASS", "")
        exe_dir = os.path.dirname(os.path.abspath(sys.executable))
        # a one-folder build carries its libraries beside the executable; a one-file one
        # unpacks them into a fresh directory of the sandbox's own /tmp
        if bundle and (bundle == exe_dir or os.path.abspath(bundle).startswith(exe_dir + os.sep)):
            paths.append(exe_dir)
    else:
        import marathon

        paths += [sys.prefix, sys.base_prefix, os.path.dirname(os.path.abspath(marathon.__file__))]
        paths.append(os.path.realpath(sys.executable))
    return paths


def resolve_claude(configured: str = "") -> str:
    """The Claude Code binary, as users install it: the setting (``claude_bin`` /
    MARATHON_CLAUDE_BIN), else ``claude`` on PATH, else the native installer's and npm's usual
    places; symlinks followed (``~/.local/bin/claude`` -> a versioned binary).  Raises
    ConfigError with what was tried."""
    tried = []
    candidates = [configured] if configured else []
    if not configured:
        candidates += [shutil.which("claude") or ""]
        home = os.path.expanduser("~")
        candidates += [f"{home}/.local/bin/claude", f"{home}/.claude/local/claude", "/usr/local/bin/claude"]
    for c in candidates:
        if not c:
            continue
        tried.append(c)
        real = os.path.realpath(c)
        if os.path.isfile(real) and os.access(real, os.X_OK):
            return real
    where = ", ".join(tried) if tried else "claude is not on PATH"
    raise ConfigError(
        f"Claude Code CLI not found ({where}): install it (npm install -g @anthropic-ai/claude-code, or the "
        "native installer) or set claude_bin / MARATHON_CLAUDE_BIN"
    )


def claude_binds(claude: str) -> tuple[str, list[str]]:
    """(the path the agent runs, extra read-only paths) for the Claude Code binary: a file is
    bound alone at IN_CLAUDE; a script inside an npm package (an older package's cli.js) needs
    its package, bound at its own path."""
    d = os.path.dirname(claude)
    while "node_modules" in d.split(os.sep) and d not in ("/", ""):
        if os.path.isfile(os.path.join(d, "package.json")):
            return claude, [d]
        d = os.path.dirname(d)
    return IN_CLAUDE, []


def host_dirs(run_dir: str, uid: int, gid: int, *, as_root: bool) -> str:
    """Without a task disk: the sandbox's writable directories on the node's own disk."""
    base = os.path.join(run_dir, "files")
    for name, mode in (("workspace", 0o755), ("home", 0o700), ("tmp", 0o700), ("agent", 0o711)):
        path = os.path.join(base, name)
        os.makedirs(path, mode=mode, exist_ok=True)
        os.chmod(path, mode)
        if as_root and name != "agent":
            os.chown(path, uid, gid)
    os.chmod(base, 0o711)
    return base


def minimal_env(home: str) -> dict[str, str]:
    return {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": home}


class ProcessSandbox:
    def __init__(self, task_id: str, child: Child, run_dir: str, log_path: str, *, workspace: str,
                 host_workspace: str | None, group: Group | None, disk: TaskDisk | None, start_fields: dict):  # fmt: skip
        self.id = task_id
        self._child = child
        self.run_dir = run_dir
        self.log_path = log_path
        self.agent_address = f"unix:{os.path.join(run_dir, 'agent.sock')}"
        self.workspace = workspace
        self.host_workspace = host_workspace
        self.group = group
        self.disk = disk
        self.start_fields = start_fields
        self._destroyed = False

    @property
    def pid(self) -> int:
        return self._child.pid

    def exited(self) -> int | None:
        return self._child.poll()

    def diagnostics(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 2000))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    async def destroy(self) -> None:
        """Kill everything the sandbox started, then unmount its disk: shielded, bounded, once."""
        if self._destroyed:
            return
        self._destroyed = True
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            if self._child.poll() is None:
                left = await kill_tree(self._child.pid)
                if left and self.group is None:
                    log.error("sandbox %s: processes %s survived SIGKILL", self.id, sorted(left))
                await self._child.wait()
            if self.group is not None:
                await self.group.destroy()
            if self.disk is not None:
                await self.disk.destroy()


class ProcessBackend:
    name = "process"

    def __init__(self, *, bwrap: str, data_dir: str, claude_bin: str, log_level: str = "info",
                 cgroups: Cgroups | None = None, disk: str = "auto"):  # fmt: skip
        self.data_dir = data_dir
        self.claude_bin = resolve_claude(claude_bin)
        self.log_level = log_level
        self.as_root = os.geteuid() == 0
        self.cgroups = cgroups or Cgroups(0)
        problem = None if bwrap == "off" else probe_bwrap(as_root=self.as_root)
        warnings: list[str] = []
        if bwrap == "required" and problem:
            raise ConfigError(f"bwrap = required, but {problem}")
        self.use_bwrap = bwrap != "off" and problem is None
        loop = loop_problem()
        if disk == "off":
            self.disk_mode, disk_note = "none", "no disk cap (disk = off)"
        elif loop is None:
            self.disk_mode, disk_note = "loop", "a loop-mounted ext4 disk per task"
        elif self.use_bwrap:
            self.disk_mode, disk_note = "tmpfs", "size-limited tmpfs per task (memory-backed)"
        else:
            self.disk_mode, disk_note = "none", f"no disk cap ({loop})"
            warnings.append(f"tasks' disk use is not capped: {loop}")
        if self.use_bwrap:
            isolation = ("bubblewrap: own root, /etc, mount, pid, network, ipc and uts namespaces; seccomp; "
                         "no network")  # fmt: skip
        else:
            isolation = "plain child process: NO isolation (the agent sees the host's files and network)"
            warnings.append(f"process sandbox without bubblewrap: {problem or 'bwrap = off'}")
        if self.cgroups.missing:
            warnings.append(self.cgroups.describe())
        self.limits_note = self.cgroups.describe()
        self.disk_note = disk_note
        self.info = SandboxInfo("process", isolation, warnings)

    def _listening_socket(self, run_dir: str) -> socket.socket:
        path = os.path.join(run_dir, "agent.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(16)
            sock.set_inheritable(True)
        except BaseException:
            sock.close()
            raise
        return sock

    async def create(self, task_id: str, run_dir: str, options: SandboxOptions = SandboxOptions()) -> ProcessSandbox:
        os.makedirs(run_dir, mode=0o711, exist_ok=True)
        os.chmod(run_dir, 0o711)
        # the log stays outside what the sandbox can reach
        log_path = os.path.join(os.path.dirname(os.path.abspath(run_dir)), f"{os.path.basename(run_dir)}-agent.log")
        uid, gid = (options.uid, options.gid) if self.as_root else (os.geteuid(), os.getegid())
        disk: TaskDisk | None = None
        group: Group | None = None
        sock: socket.socket | None = None
        filter_fd: int | None = None
        try:
            if self.disk_mode == "loop" and options.disk:
                disk = TaskDisk(run_dir, options.disk, uid, gid)
                await disk.create()
            try:
                group = self.cgroups.create(f"sandbox-{task_id}", options.limits)
            except OSError as exc:
                raise SandboxError(f"could not create the sandbox's cgroup: {exc}") from None
            sock = self._listening_socket(run_dir)
            listen = f"fd:{sock.fileno()}"
            pass_fds = [sock.fileno()]
            if self.use_bwrap:
                claude, extra = claude_binds(self.claude_bin)
                if not self.as_root:
                    uid = gid = options.uid  # the sandbox user's id inside the user namespace
                profile = Profile(
                    uid=uid, gid=gid, as_root=self.as_root, etc_dir=write_etc(os.path.join(run_dir, "etc"), uid, gid),
                    runtime=runtime_paths() + extra, claude=self.claude_bin if claude == IN_CLAUDE else "",
                )  # fmt: skip
                if disk is not None:
                    profile.workspace, profile.home = disk.path("workspace"), disk.path("home")
                    profile.tmp, profile.agent_dir = disk.path("tmp"), disk.path("agent")
                elif self.as_root:  # no disk cap: the sandbox's directories on the node's disk
                    base = host_dirs(run_dir, uid, gid, as_root=True)
                    profile.workspace, profile.home = os.path.join(base, "workspace"), os.path.join(base, "home")
                    profile.tmp, profile.agent_dir = os.path.join(base, "tmp"), os.path.join(base, "agent")
                elif self.disk_mode == "tmpfs" and options.disk:
                    profile.tmpfs_size = options.disk
                    profile.tmpfs_small = max(options.disk // 8, 16 * 1024 * 1024)
                abi = seccomp.native_abi()
                if abi is not None:
                    filter_fd = seccomp.filter_fd(abi)
                    profile.seccomp_fd = filter_fd
                    pass_fds.append(filter_fd)
                cmd = argv(profile) + agent_command()
                env = minimal_env(IN_HOME)
                workspace, host_workspace = IN_WORKSPACE, disk.path("workspace") if disk else None
                private = IN_AGENT if self.as_root else "/tmp/.marathon-agent"
                start = {"run_uid": uid, "run_gid": gid, "claude_bin": claude, "home": IN_HOME, "private_dir": private}
                if not host_workspace and self.as_root:
                    host_workspace = profile.workspace
            else:
                base = disk.mountpoint if disk is not None else host_dirs(run_dir, uid, gid, as_root=self.as_root)
                cmd = agent_command()
                env = {**minimal_env(os.path.join(base, "home")), "TMPDIR": os.path.join(base, "tmp")}
                workspace = host_workspace = os.path.join(base, "workspace")
                start = {"run_uid": uid, "run_gid": gid, "claude_bin": self.claude_bin,
                         "home": os.path.join(base, "home"), "private_dir": os.path.join(base, "agent")}  # fmt: skip
            cmd = cmd + ["serve", "--role", "agent", "--listen", listen, "--log-level", self.log_level]
            with open(log_path, "ab") as logf:
                try:
                    child = spawn(cmd, env=env, cwd=run_dir, stdout=logf.fileno(), stderr=logf.fileno(),
                                  pass_fds=pass_fds, enter=group.procs_files if group else ())  # fmt: skip
                except OSError as exc:
                    raise SandboxError(f"could not start the sandbox: {exc}") from None
        except BaseException:
            if group is not None:
                await group.destroy()
            if disk is not None:
                await disk.destroy()
            raise
        finally:
            if sock is not None:
                sock.close()  # the agent holds it now
            if filter_fd is not None:
                os.close(filter_fd)
        log.debug("sandbox %s started: pid %d (%s)", task_id, child.pid, "bwrap" if self.use_bwrap else "plain")
        return ProcessSandbox(task_id, child, run_dir, log_path, workspace=workspace, host_workspace=host_workspace,
                              group=group, disk=disk, start_fields=start)  # fmt: skip

    async def aclose(self) -> None:
        pass


def probe_bwrap(*, as_root: bool | None = None) -> str | None:
    """None when bubblewrap works here with the sandbox's full profile, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed (Debian package bubblewrap)"
    as_root = os.geteuid() == 0 if as_root is None else as_root
    import tempfile

    with tempfile.TemporaryDirectory(prefix="marathon-probe-") as d:
        uid = os.geteuid() if as_root else 4242
        profile = Profile(uid=uid, gid=uid, as_root=as_root, etc_dir=write_etc(d, uid, uid), runtime=runtime_paths())
        fd = None
        abi = seccomp.native_abi()
        if abi is not None:
            fd = seccomp.filter_fd(abi)
            profile.seccomp_fd = fd
        try:
            res = subprocess.run(argv(profile) + ["true"], capture_output=True, timeout=20,
                                 env=minimal_env("/"), pass_fds=[fd] if fd is not None else ())  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"bwrap failed to run: {exc}"
        finally:
            if fd is not None:
                os.close(fd)
    if res.returncode != 0:
        return f"bwrap cannot create namespaces here: {res.stderr.decode(errors='replace').strip()[:300]}"
    return None
