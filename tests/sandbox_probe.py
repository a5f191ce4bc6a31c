"""Run inside a sandbox (as Claude Code's Bash tool would run it) by the sandbox-escape tests.

Reads one JSON object on stdin: {"secrets": [base64...], "host_paths": [...], "ports": [...],
"host_ips": [...]} (secrets arrive encoded so that no process's command line or environment
holds them in the clear), tries every way out it knows, and prints one JSON line:
{"probe": {"denied": bool, "detail": str}, ...}.  Only the standard library: it runs under
whatever python3 the sandbox can see.
"""

import base64
import ctypes
import errno
import json
import os
import socket
import subprocess
import sys

cfg = json.loads(sys.stdin.read())
SECRETS = [base64.b64decode(s) for s in cfg["secrets"]]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out: dict[str, dict] = {}


def record(name, denied, detail=""):
    out[name] = {"denied": bool(denied), "detail": str(detail)[:400]}


def syscall_denied(name, nr, *args):
    res = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    err = ctypes.get_errno()
    record(name, res == -1 and err in (errno.EPERM, errno.ENOSYS, errno.EACCES), f"ret {res} errno {err}")


# 1. every process's environment and command line: no secret, no node setting
leaks = []
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    for what in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as pf:
                data = pf.read()
        except OSError:
            continue
        for s in SECRETS:
            if s in data:
                leaks.append(f"secret in /proc/{pid}/{what}")
        if what == "environ":
            for var in data.split(b"\0"):
                if var.startswith((b"MARATHON_", b"GITHUB_", b"ANTHROPIC_ADMIN")):
                    leaks.append(f"/proc/{pid}/environ has {var.split(b'=')[0].decode()}")
record("proc_environ_cmdline", not leaks, "; ".join(leaks))
try:
    with open("/proc/1/environ", "rb") as ef:
        names = sorted(v.split(b"=")[0].decode() for v in ef.read().split(b"\0") if v)
    record("pid1_environ_minimal", set(names) <= {"PATH", "LANG", "HOME"}, names)
except OSError as exc:
    record("pid1_environ_minimal", True, exc)

# 2. files: no secret in anything readable we look at, no host state
RUNTIME = [p.rstrip("/") for p in cfg["runtime_paths"]]


def is_runtime(path):
    return any(path == r or path.startswith(r + "/") for r in RUNTIME)


found = []
WALK = ("/etc", "/opt", "/srv", "/home", "/root", "/var", "/run", "/tmp", "/mnt", "/media", "/workspace")
for root in cfg.get("walk", WALK):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_runtime(os.path.join(dirpath, d))]
        for fn in filenames:
            path = os.path.join(dirpath, fn)
            try:
                with open(path, "rb") as df:
                    content = df.read(4 * 1024 * 1024)
            except OSError:
                continue
            if any(s in content for s in SECRETS):
                found.append(path)
record("no_secret_in_files", not found, found)
etc = set(os.listdir("/etc"))
bad_etc = sorted(etc & {"shadow", "gshadow", "environment", "gitconfig", "machine-id", "sudoers", "npmrc", "pip.conf"})
with open("/etc/hostname") as hf:
    hostname = hf.read().strip()
record("etc_is_the_sandboxes", not bad_etc and hostname == "marathon-sandbox", bad_etc)
with open("/etc/passwd") as pw:
    users = [line.split(":")[0] for line in pw if line.strip()]
record("passwd_is_the_sandboxes", set(users) <= {"root", "marathon", "nobody"}, users)
ALLOWED = RUNTIME + ["/opt/claude/claude", "/home/marathon"]
strays = []
for d in ("/opt", "/srv", "/home", "/root", "/mnt", "/media"):
    if os.path.isdir(d):
        for name in os.listdir(d):
            path = os.path.join(d, name)
            if not any(a == path or a.startswith(path + "/") for a in ALLOWED):
                strays.append(path)
record("no_host_opt_srv_home_root", not strays, strays)
var_entries = sorted(os.listdir("/var")) if os.path.isdir("/var") else []
record("no_host_var", var_entries in ([], ["tmp"]), var_entries)
visible = [p for p in cfg["host_paths"] if os.path.exists(p)]
record("host_paths_hidden", not visible, visible)
try:
    with open("/usr/marathon-probe", "w"):
        pass
    record("usr_read_only", False, "wrote /usr")
except OSError as exc:
    record("usr_read_only", exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM), exc)
try:
    with open("/marathon-probe", "w"):
        pass
    record("root_read_only", False, "wrote /")
except OSError as exc:
    record("root_read_only", exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM), exc)

# 3. the kernel surface
r = subprocess.run(["unshare", "-Ur", "true"], capture_output=True)
record("unshare_user_ns", r.returncode != 0, r.stderr.decode()[-200:])
r = subprocess.run(["unshare", "-n", "true"], capture_output=True)
record("unshare_net_ns", r.returncode != 0, r.stderr.decode()[-200:])
params = ctypes.create_string_buffer(120)
syscall_denied("io_uring_setup", 425, 4, ctypes.addressof(params))
syscall_denied("add_key", 248, 0, 0, 0, 0, 0)
syscall_denied("keyctl", 250, 0, 0, 0, 0, 0)
syscall_denied("bpf", 321, 0, 0, 0)
syscall_denied("perf_event_open", 298, 0, 0, -1, -1, 0)
syscall_denied("ptrace_attach_pid1", 101, 16, 1, 0, 0)
syscall_denied("mount", 165, 0, 0, 0, 0, 0)
syscall_denied("userfaultfd", 323, 0)
syscall_denied("syslog", 103, 3, 0, 0)
syscall_denied("setns", 308, 0, 0)

# 4. the network: nothing of the node's, the orchestrator's or the upstream's reachable
reached = []
for host in ["127.0.0.1", *cfg["host_ips"]]:
    for port in cfg["ports"]:
        sock = socket.socket()
        sock.settimeout(2)
        try:
            sock.connect((host, port))
            reached.append(f"{host}:{port}")
        except OSError:
            pass
        finally:
            sock.close()
record("no_network_to_node_or_orchestrator", not reached, reached)
ifaces = sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []
record("only_loopback", ifaces in ([], ["lo"]), ifaces)

# 5. identity
record("uid", os.getuid() != 0, f"uid {os.getuid()} gid {os.getgid()} groups {os.getgroups()}")
print("PROBE-RESULT " + json.dumps(out))
