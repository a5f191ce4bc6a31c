"""``marathon doctor``: what this host can run and enforce, and whether the client reaches its
orchestrator — a table of checks (ok / warn / FAIL) and an exit code (1 when a check failed).

Node checks are about this machine: virtualisation (hardware KVM, the software PVM driver, or
none), the VMMs and their versions, the guest image against its manifest, bubblewrap with the
sandbox's whole profile, the seccomp filter, which resource limits cgroups can enforce, the task
disk cap, Claude Code, free space in the data dir, the clock.  Client checks: the orchestrator
at ``url`` answers, and who the saved credentials are.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from dataclasses import dataclass

from marathon.config import Config


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if out.returncode == 0 and text else None


def image_check(image: str, *, verify: bool) -> Check:
    from marathon.node.sandbox.detect import image_problem

    problem = image_problem(image, ("vmlinux", "rootfs.ext4", "manifest.json"))
    if problem:
        return Check("guest image", "warn", problem)
    with open(os.path.join(image, "manifest.json")) as f:
        manifest = json.load(f)
    wrong = []
    for name, art in manifest.get("artefacts", {}).items():
        path = os.path.join(image, name)
        if not os.path.exists(path):
            continue
        if os.path.getsize(path) != art.get("size"):
            wrong.append(f"{name} size")
        elif verify:
            import hashlib

            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != art.get("sha256"):
                wrong.append(f"{name} sha256")
    if wrong:
        return Check("guest image", "fail", f"{image} does not match its manifest: {', '.join(wrong)}")
    claude = manifest.get("claude_code", {}).get("version", "?")
    how = "sizes and sha256" if verify else "sizes (--verify for sha256)"
    return Check("guest image", "ok", f"{image}: matches its manifest ({how}); Claude Code {claude} inside")


def clock_check() -> Check:
    class Timex(ctypes.Structure):
        _fields_ = [("modes", ctypes.c_uint), ("pad", ctypes.c_byte * 204)]

    try:
        tx = Timex()
        state = ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return Check("clock", "warn", "cannot ask the kernel (adjtimex)")
    if state == 5:  # TIME_ERROR: not synchronised
        return Check("clock", "warn", "not synchronised (NTP): leases, sessions and the ledger's timestamps drift")
    return Check("clock", "ok", "synchronised" if state in (0, 1, 2, 3, 4) else f"adjtimex state {state}")


def node_checks(config: Config, *, verify: bool = False) -> list[Check]:
    from marathon.errors import ConfigError
    from marathon.node import seccomp
    from marathon.node.cgroups import Cgroups
    from marathon.node.disk import loop_problem
    from marathon.node.sandbox.detect import default_image_dir, hardware_kvm
    from marathon.node.sandbox.firecracker import find_binary
    from marathon.node.sandbox.process import probe_bwrap, resolve_claude

    out: list[Check] = []
    kvm_ok, kvm = hardware_kvm()
    if kvm_ok:
        out.append(Check("virtualisation", "ok", kvm))
    elif "kvm_pvm" in kvm:
        out.append(Check("virtualisation", "warn", f"PVM, not hardware KVM: {kvm}"))
    else:
        out.append(Check("virtualisation", "warn", kvm))
    for name, binary in (("firecracker", config.firecracker_bin or find_binary("firecracker")),
                         ("jailer", find_binary("jailer")), ("qemu", shutil.which("qemu-system-x86_64") or "")):  # fmt: skip
        version = _version([binary, "--version"]) if binary else None
        out.append(Check(name, "ok" if version else "warn", version or f"not found ({binary or 'not installed'})"))
    out.append(image_check(config.image_dir or default_image_dir(config.data_dir), verify=verify))
    bwrap = probe_bwrap()
    version = _version(["bwrap", "--version"]) or "bubblewrap"
    out.append(Check("bubblewrap", "ok" if bwrap is None else "warn",
                     f"{version}: the sandbox's profile runs" if bwrap is None
                     else f"process sandboxes run WITHOUT isolation: {bwrap}"))  # fmt: skip
    abi = seccomp.native_abi()
    out.append(Check("seccomp", "ok" if abi else "warn",
                     f"{abi.name}: {len(seccomp.DENIED)} system calls denied" if abi else "no syscall table for this CPU"))  # fmt: skip
    groups = Cgroups.detect("doctor", prefer="off" if config.limits == "off" else "auto", setup=False)
    missing = {"memory", "pids"} - set(groups.enforced)
    status = "ok" if not groups.missing else ("fail" if missing and config.limits == "required" else "warn")
    out.append(Check("limits", status, groups.describe()))
    loop = loop_problem()
    if config.disk_limit == "off":
        out.append(Check("disk cap", "warn", "off (disk_limit = off)"))
    else:
        out.append(Check("disk cap", "ok" if loop is None else "warn",
                         "a loop-mounted ext4 disk per task" if loop is None else loop))  # fmt: skip
    out.append(
        Check("sandbox uids", "ok", f"{config.sandbox_uid}…{config.sandbox_uid + config.slots - 1} (one per slot)")
    )
    try:
        claude = resolve_claude(config.claude_bin)
        version = _version([claude, "--version"])
        out.append(Check("claude code", "ok" if version else "warn", f"{claude}: {version or 'does not run'}"))
    except ConfigError as exc:
        out.append(Check("claude code", "fail" if config.sandbox == "process" else "warn", str(exc)))
    try:
        usage = shutil.disk_usage(
            config.data_dir if os.path.isdir(config.data_dir) else os.path.dirname(config.data_dir)
        )
        free_gib = usage.free / 1024**3
        status = "ok" if free_gib >= 20 else ("warn" if free_gib >= 2 else "fail")
        out.append(Check("data dir", status, f"{config.data_dir}: {free_gib:.1f} GiB free"))
    except OSError as exc:
        out.append(Check("data dir", "fail", f"{config.data_dir}: {exc}"))
    out.append(clock_check())
    return out


def client_checks(config: Config) -> list[Check]:
    import httpx

    from marathon.cli import credentials

    out: list[Check] = []
    try:
        r = httpx.get(config.url.rstrip("/") + "/healthz", timeout=5, trust_env=False)
        out.append(
            Check("orchestrator", "ok" if r.status_code == 200 else "fail", f"{config.url}: HTTP {r.status_code}")
        )
    except httpx.HTTPError as exc:
        out.append(Check("orchestrator", "fail", f"{config.url}: {exc}"))
        return out
    token = config.token or (credentials.load(config.url) or {}).get("token")
    if not token:
        out.append(Check("signed in", "warn", "no credentials: marathon login EMAIL (or MARATHON_TOKEN)"))
        return out
    r = httpx.get(config.url.rstrip("/") + "/v1/auth/whoami", headers={"Authorization": f"Bearer {token}"},
                  timeout=5, trust_env=False)  # fmt: skip
    if r.status_code == 200:
        me = r.json()
        out.append(Check("signed in", "ok", f"as {me.get('email')}{' (administrator)' if me.get('admin') else ''}"))
    else:
        out.append(Check("signed in", "fail", f"the saved credentials are refused (HTTP {r.status_code})"))
    return out


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    mark = {"ok": "ok", "warn": "warn", "fail": "FAIL"}
    return "\n".join(f"{c.name:<{width}}  {mark[c.status]:<4}  {c.detail}" for c in checks)
