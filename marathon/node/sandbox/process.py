"""The ``process`` backend: the agent as a child process under bubblewrap.

With bwrap usable: new mount, pid, net, ipc and uts namespaces, the host read-only, private
/tmp, the workspace and a run directory bound in, the node's data dir hidden, a clean
environment, only the capabilities the agent needs to drop to the unprivileged uid.  The
sandbox has only loopback: Claude Code reaches the API through the agent's tunnel.
Without bwrap (and ``bwrap = auto``): a plain child process, with a warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import trio

from marathon.errors import ConfigError, SandboxError
from marathon.node.procs import kill_tree
from marathon.node.sandbox import SandboxInfo

log = logging.getLogger("marathon.sandbox")

CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL", "CAP_FOWNER", "CAP_DAC_OVERRIDE")
IN_WORKSPACE = "/workspace"
IN_RUN = "/run/marathon"


def agent_command() -> list[str]:
    """How to start this same program as an agent."""
    if getattr(sys, "frozen", False):
        return [sys.executable]
    return [sys.executable, "-m", "marathon"]


def _parents(path: str) -> list[str]:
    parts, out = path.strip("/").split("/")[:-1], []
    for i in range(len(parts)):
        out.append("/" + "/".join(parts[: i + 1]))
    return out


def runtime_paths(claude_bin: str = "") -> list[str]:
    """What the agent needs to see of the host: the interpreter (or the one-file executable),
    the marathon package, the Claude Code binary.  Nothing else of /home, /root, /var…"""
    paths = [sys.executable]
    if not getattr(sys, "frozen", False):
        import marathon

        paths += [sys.prefix, sys.base_prefix, os.path.dirname(os.path.abspath(marathon.__file__))]
    if claude_bin:
        paths.append(os.path.realpath(claude_bin))
        if os.path.abspath(claude_bin) != os.path.realpath(claude_bin):
            paths.append(os.path.abspath(claude_bin))
    return paths


def bwrap_args(
    *, workspace: str, run_dir: str, hide: list[str], env: dict[str, str], as_root: bool, extra_ro: list[str] = ()
) -> list[str]:
    """A new root (tmpfs) with the system read-only, the runtime bound in, and only
    loopback networking."""
    args = [
        "bwrap",
        "--die-with-parent",
        "--new-session",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--hostname",
        "marathon-sandbox",
    ]
    for top in ("usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt"):
        path = "/" + top
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/var/tmp", "--tmpfs", "/run"]
    made = {"/tmp", "/run", "/var"}
    bound: list[str] = []
    for path in sorted(set(extra_ro)):
        if not os.path.exists(path) or path.split("/")[1] in ("usr", "etc", "bin", "sbin", "lib", "lib64", "opt"):
            continue
        if any(path.startswith(b.rstrip("/") + "/") for b in bound):
            continue  # already visible through a bound parent
        bound.append(path)
        for parent in _parents(path):
            if parent not in made:
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", path, path]
    for path in hide:
        if os.path.isdir(path) and any(path == p or path.startswith(p.rstrip("/") + "/") for p in extra_ro):
            args += ["--tmpfs", path]
    args += [
        "--perms",
        "0755",
        "--dir",
        IN_RUN,
        "--bind",
        run_dir,
        IN_RUN,
        "--perms",
        "0755",
        "--dir",
        IN_WORKSPACE,
        "--bind",
        workspace,
        IN_WORKSPACE,
        "--chdir",
        IN_WORKSPACE,
        "--clearenv",
    ]
    if not as_root:
        args += ["--unshare-user"]
    else:
        args += ["--cap-drop", "ALL"]
        for cap in CAPS:
            args += ["--cap-add", cap]
    for k, v in env.items():
        args += ["--setenv", k, v]
    return args


def probe_bwrap() -> str | None:
    """None when bubblewrap works here, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed (Debian package bubblewrap)"
    args = bwrap_args(
        workspace="/tmp", run_dir="/tmp", hide=[], env={}, as_root=os.geteuid() == 0, extra_ro=runtime_paths()
    )
    try:
        res = subprocess.run(args + ["true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap failed to run: {exc}"
    if res.returncode != 0:
        return f"bwrap cannot create namespaces here: {res.stderr.decode(errors='replace').strip()[:300]}"
    return None


class ProcessSandbox:
    def __init__(self, task_id: str, proc: trio.Process, run_dir: str, workspace: str, log_path: str):
        self.id = task_id
        self._proc = proc
        self.run_dir = run_dir
        self.workspace = workspace
        self.log_path = log_path
        self.agent_address = f"unix:{os.path.join(run_dir, 'agent.sock')}"
        self._destroyed = False

    def exited(self) -> int | None:
        return self._proc.poll()

    def diagnostics(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 2000))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            if self._proc.poll() is not None:
                return  # already gone (and its pid may belong to someone else by now)
            left = await kill_tree(self._proc.pid)
            if left:
                log.error("sandbox %s: processes %s survived SIGKILL", self.id, sorted(left))
            await self._proc.wait()


class ProcessBackend:
    name = "process"

    def __init__(self, *, bwrap: str, data_dir: str, claude_bin: str, sandbox_uid: int, log_level: str = "info"):
        self.data_dir = data_dir
        self.claude_bin = claude_bin
        self.sandbox_uid = sandbox_uid
        self.log_level = log_level
        self.as_root = os.geteuid() == 0
        problem = None if bwrap == "off" else probe_bwrap()
        warnings: list[str] = []
        if bwrap == "required" and problem:
            raise ConfigError(f"bwrap = required, but {problem}")
        self.use_bwrap = bwrap != "off" and problem is None
        if self.use_bwrap:
            isolation = "bubblewrap: own mount, pid, network, ipc and uts namespaces; host read-only; no network"
        else:
            isolation = "plain child process: NO isolation (the agent sees the host's files and network)"
            warnings.append(f"process sandbox without bubblewrap: {problem or 'bwrap = off'}")
        self.info = SandboxInfo("process", isolation, warnings)

    async def create(self, task_id: str, workspace_host: str, run_dir: str) -> ProcessSandbox:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        # the log stays outside what the sandbox can write (run_dir is bound into it)
        log_path = os.path.join(os.path.dirname(os.path.abspath(run_dir)), f"{os.path.basename(run_dir)}-agent.log")
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": "/tmp",
            "MARATHON_LOG_LEVEL": self.log_level,
            "MARATHON_SANDBOX_UID": str(self.sandbox_uid),
        }
        if self.claude_bin:
            env["MARATHON_CLAUDE_BIN"] = self.claude_bin
        if self.use_bwrap:
            env["MARATHON_ISOLATION"] = "bubblewrap"
            listen = f"unix:{IN_RUN}/agent.sock"
            cmd = (
                bwrap_args(
                    workspace=workspace_host,
                    run_dir=run_dir,
                    hide=[self.data_dir],
                    env=env,
                    as_root=self.as_root,
                    extra_ro=runtime_paths(self.claude_bin),
                )
                + agent_command()
                + ["serve", "--role", "agent", "--listen", listen]
            )
            workspace = IN_WORKSPACE
            child_env = None
        else:
            env["MARATHON_ISOLATION"] = "none"
            listen = f"unix:{os.path.join(run_dir, 'agent.sock')}"
            cmd = agent_command() + ["serve", "--role", "agent", "--listen", listen]
            workspace = workspace_host
            child_env = env
        logf = open(log_path, "ab")
        try:
            proc = await trio.lowlevel.open_process(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                env=child_env,
                cwd=run_dir,
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxError(f"could not start the sandbox: {exc}") from None
        finally:
            logf.close()
        log.debug("sandbox %s started: pid %d (%s)", task_id, proc.pid, "bwrap" if self.use_bwrap else "plain")
        return ProcessSandbox(task_id, proc, run_dir, workspace, log_path)

    async def aclose(self) -> None:
        pass
