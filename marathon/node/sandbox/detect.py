"""What this host can run, said honestly.  /dev/kvm may be a software PVM driver
(``kvm_pvm``) that cannot run stock guest kernels; only vmx/svm means hardware KVM."""

from __future__ import annotations

import os
import re
import subprocess


def cpu_virt_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split() if w in ("vmx", "svm")}
    except OSError:
        return set()


def hardware_kvm() -> tuple[bool, str]:
    """(True, "hardware KVM (vmx)") or (False, why not)."""
    flags = cpu_virt_flags()
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm (no KVM on this host)"
    if os.path.isdir("/sys/module/kvm_pvm") and not flags:
        return False, (
            "/dev/kvm is kvm_pvm, a software PVM driver, and the CPU has no vmx/svm: "
            "stock Linux guests cannot run on it"
        )
    if not flags:
        return False, "the CPU has no vmx/svm flag (no hardware virtualisation)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    return True, f"hardware KVM ({'/'.join(sorted(flags))})"


def host_tsc_khz() -> int | None:
    """The host TSC in kHz: $MARATHON_TSC_KHZ, the kernel log, else /proc/cpuinfo's MHz.
    (A TCG guest must be told it: a wrong value freezes the guest clock.)"""
    if os.environ.get("MARATHON_TSC_KHZ"):
        return int(os.environ["MARATHON_TSC_KHZ"])
    try:
        text = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for pattern in (
        r"tsc: Refined TSC clocksource calibration: ([0-9.]+) MHz",
        r"tsc: Detected ([0-9.]+) MHz TSC",
        r"tsc: Detected ([0-9.]+) MHz processor",
    ):
        found = re.findall(pattern, text)
        if found:
            return round(float(found[-1]) * 1000)
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"cpu MHz\s*:\s*([0-9.]+)", f.read())
    except OSError:
        m = None
    return round(float(m.group(1)) * 1000) if m else None


def default_image_dir(data_dir: str = "") -> str:
    """$MARATHON_IMAGE_DIR, <data_dir>/image, or the checkout's .cache/image/current."""
    if os.environ.get("MARATHON_IMAGE_DIR"):
        return os.environ["MARATHON_IMAGE_DIR"]
    if data_dir and os.path.isdir(os.path.join(data_dir, "image")):
        return os.path.join(data_dir, "image")
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", ".cache", "image", "current"))


def image_problem(image_dir: str, files: tuple[str, ...]) -> str | None:
    missing = [n for n in files if not os.path.isfile(os.path.join(image_dir, n))]
    if missing:
        return f"guest image missing ({', '.join(missing)} not in {image_dir}): run make image"
    return None
