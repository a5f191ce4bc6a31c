#!/usr/bin/env python3
"""Boot the guest image in QEMU `-M microvm` and time it (`make image-check`).

1. cold boot: per-VM qcow2 overlay on rootfs.ext4, user networking restricted to one
   hostfwd (127.0.0.1:PORT -> 10.0.2.15:7000), QMP on a Unix socket; waits until a TCP
   connect to PORT is answered by the agent; prints boot -> ready.
2. snapshot: QMP stop + migrate to a file (exec:cat > state), then quit.
3. restore: a new QEMU with the same devices, a fresh overlay stacked on the snapshot's
   disk, a new hostfwd port, and -incoming exec:cat state; prints restore -> ready.

TCG by default (here /dev/kvm is a software PVM driver that cannot run stock kernels).
The guest TSC runs at the host TSC rate under TCG, so the kernel is told the rate
(tsc_early_khz, lpj) instead of calibrating it against emulated timers.
"""

from __future__ import annotations

import argparse
import builtins
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
print = builtins.print  # with --json, main() sends progress to stderr instead
READY_LINE = "marathon-agent-placeholder ready"
GUEST_IP = "10.0.2.15"
AGENT_PORT = 7000
# ACPI on: the Debian cloud kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, so the
# virtio-mmio devices are found through the DSDT (LNRO0005), not virtio_mmio.device=.
MACHINE = "microvm,acpi=on,auto-kernel-cmdline=off,x-option-roms=off"


def _msgpack(obj) -> bytes:
    """Just enough msgpack for a Hello: maps of short strings and small ints."""
    if isinstance(obj, dict):
        return bytes([0x80 | len(obj)]) + b"".join(_msgpack(k) + _msgpack(v) for k, v in obj.items())
    if isinstance(obj, str):
        data = obj.encode()
        return (bytes([0xA0 | len(data)]) if len(data) < 32 else bytes([0xD9, len(data)])) + data
    if isinstance(obj, int) and 0 <= obj < 128:
        return bytes([obj])
    raise TypeError(obj)


# The real agent answers only after the dialer's Hello (marathon/protocol/framing.py:
# 4-byte big-endian length + msgpack of the tagged struct).
HELLO_FRAME = (lambda payload: len(payload).to_bytes(4, "big") + payload)(
    _msgpack({"type": "hello", "protocol": 1, "role": "node", "version": "boot-check"})
)


def host_tsc_khz() -> int:
    """Host TSC frequency in kHz (the node's own detection: $MARATHON_TSC_KHZ, the kernel log, /proc/cpuinfo)."""
    sys.path.insert(0, str(REPO))
    from marathon.node.sandbox.detect import host_tsc_khz as detect_tsc

    khz = detect_tsc()
    if not khz:
        raise SystemExit("cannot find the host TSC frequency: set MARATHON_TSC_KHZ")
    return khz


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Qmp:
    """Minimal synchronous QMP client (greeting, qmp_capabilities, execute)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP closed")
        return json.loads(line)

    def execute(self, command: str, **arguments) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")
            # events are skipped

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class Vm:
    def __init__(
        self,
        image: Path,
        work: Path,
        name: str,
        disk: Path,
        *,
        kernel: str,
        tsc_khz: int,
        hz: int,
        smp: int,
        mem: int,
        accel: str,
        extra_cmdline: str,
        netdev_extra: str = "",
        machine: str = "",
        expect_line: bool = True,
        incoming: str | None = None,
    ) -> None:
        self.work = work
        self.expect_line = expect_line
        self.name = name
        self.port = free_port()
        self.qmp_path = work / f"{name}.qmp"
        self.serial = work / f"{name}.serial.log"
        lpj = tsc_khz * 1000 // hz
        cmdline = " ".join(
            filter(
                None,
                [
                    "console=ttyS0 root=/dev/vda rw panic=-1 quiet",
                    f"tsc_early_khz={tsc_khz} lpj={lpj} tsc=reliable",
                    f"marathon.ip={GUEST_IP}/24 marathon.gw=10.0.2.2 marathon.listen=tcp:0.0.0.0:{AGENT_PORT}",
                    extra_cmdline,
                ],
            )
        )
        accel_arg = "tcg,thread=multi,tb-size=256" if accel == "tcg" else accel
        self.argv = [
            "qemu-system-x86_64",
            "-M",
            machine or MACHINE,
            "-accel",
            accel_arg,
            "-cpu",
            "max",
            "-smp",
            str(smp),
            "-m",
            str(mem),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(image / kernel),
            "-initrd",
            str(image / "initramfs.cpio.gz"),
            "-append",
            cmdline,
            "-serial",
            f"file:{self.serial}",
            "-drive",
            f"id=root,file={disk},format=qcow2,if=none,discard=unmap",
            "-device",
            "virtio-blk-device,drive=root",
            "-netdev",
            f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.port}-{GUEST_IP}:{AGENT_PORT}" + netdev_extra,
            "-device",
            "virtio-net-device,netdev=n0",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if incoming:
            self.argv += ["-incoming", incoming]
        self.started = time.monotonic()
        log = open(work / f"{name}.qemu.log", "wb")  # noqa: SIM115  (the VM writes it for its whole life)
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        self.qmp: Qmp | None = None

    def control(self) -> Qmp:
        if self.qmp is None:
            self.qmp = Qmp(self.qmp_path)
        return self.qmp

    def probe(self) -> str | None:
        """The agent's first bytes on the forwarded port, or None while it is not listening.

        slirp accepts the host-side connection before it knows whether the guest port
        is open (a closed port shows up as EOF, a guest that is not up yet as silence),
        so only data from the guest proves the agent is there: the placeholder speaks
        first, the real agent answers the dialer's Hello."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.settimeout(1.0)
                if not self.expect_line:
                    s.sendall(HELLO_FRAME)
                    head = s.recv(4096)
                    if len(head) > 4 and b"hello" in head:
                        return f"agent hello ({int.from_bytes(head[:4], 'big')} byte frame)"
                    return None
                data = b""
                while b"\n" not in data or data.count(b"\n") < 2:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data.decode(errors="replace") or None
        except OSError:
            return None

    def wait_ready(self, timeout: float) -> tuple[float, str]:
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name}: QEMU exited with {self.proc.returncode}\n{self.tail()}")
            answer = self.probe()
            if answer and (answer.startswith(READY_LINE) or not self.expect_line):  # probe() checked the Hello
                return time.monotonic() - self.started, answer
            time.sleep(0.05)
        raise SystemExit(f"{self.name}: agent not ready after {timeout} s\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        out = []
        for path in (self.serial, self.work / f"{self.name}.qemu.log"):
            if path.exists():
                out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def quit(self) -> None:
        try:
            self.control().execute("quit")
        except (OSError, RuntimeError, ConnectionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.qmp:
            self.qmp.close()


def guest_clock(answer: str) -> tuple[float, float] | None:
    m = re.search(r"time=(\d+) uptime=([0-9.]+)", answer)
    return (float(m.group(1)), float(m.group(2))) if m else None


def overlay(path: Path, backing: Path, fmt: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", fmt, str(path)], check=True)
    return path


def snapshot(vm: Vm, state: Path, timeout: float = 60) -> tuple[float, int]:
    """Pause the VM and migrate its state to a file; returns (seconds, bytes)."""
    qmp = vm.control()
    t0 = time.monotonic()
    qmp.execute("stop")
    qmp.execute("migrate", uri=f"exec:cat > {state}")
    while time.monotonic() - t0 < timeout:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return time.monotonic() - t0, state.stat().st_size
        if status in ("failed", "cancelled"):
            raise SystemExit(f"migrate to file failed: {info}")
        time.sleep(0.02)
    raise SystemExit("migrate to file timed out")


def resume_after_incoming(vm: Vm, timeout: float) -> float:
    """Wait for -incoming to finish, then `cont`: a VM stopped before the snapshot stays
    paused after the restore (QEMU restores the source's run state)."""
    qmp = vm.control()
    while time.monotonic() - vm.started < timeout:
        status = qmp.execute("query-status")["status"]
        if status == "running":
            break
        if status in ("paused", "postmigrate", "prelaunch"):
            qmp.execute("cont")
            break
        if status not in ("inmigrate",):
            raise SystemExit(f"{vm.name}: unexpected status {status} after -incoming\n{vm.tail()}")
        time.sleep(0.01)
    else:
        raise SystemExit(f"{vm.name}: incoming migration did not finish in {timeout} s")
    return time.monotonic() - vm.started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default=str(REPO / ".cache/image/current"))
    ap.add_argument("--kernel", default="vmlinux", choices=["vmlinux", "vmlinuz"])
    ap.add_argument("--runs", type=int, default=1, help="cold boots and restores to time (p50 reported)")
    ap.add_argument("--no-snapshot", action="store_true")
    ap.add_argument("--restore-delay", type=float, default=0, help="seconds between snapshot and restore")
    ap.add_argument("--accel", default="tcg", help="tcg (default) or kvm")
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--mem", type=int, default=512)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--cmdline", default="", help="extra kernel command line")
    ap.add_argument("--machine", default=MACHINE, help="the -M value")
    ap.add_argument("--netdev", default="", help="appended to the -netdev user option (e.g. ,guestfwd=...)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, overlays, state)")
    ap.add_argument(
        "--hello",
        action="store_true",
        help="probe with the protocol's Hello and wait for the agent's (default for a real marathon "
        "binary) instead of reading the placeholder's ready line",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    if args.json:  # progress to stderr, the result alone on stdout
        global print
        print = lambda *a, **k: builtins.print(*a, **{**k, "file": sys.stderr})  # noqa: E731
    image = Path(args.image).resolve()
    manifest = json.loads((image / "manifest.json").read_text())
    hz = manifest["kernel"]["hz"]
    tsc_khz = host_tsc_khz()
    work = Path(tempfile.mkdtemp(prefix="marathon-boot-check-"))
    common = dict(
        kernel=args.kernel,
        tsc_khz=tsc_khz,
        hz=hz,
        smp=args.smp,
        mem=args.mem,
        accel=args.accel,
        extra_cmdline=args.cmdline,
        netdev_extra=args.netdev,
        machine=args.machine,
        expect_line=not (args.hello or not manifest["marathon"]["placeholder"]),
    )
    result: dict = {
        "image": str(image),
        "input_hash": manifest["input_hash"],
        "tsc_khz": tsc_khz,
        "lpj": tsc_khz * 1000 // hz,
        "hz": hz,
        "kernel": args.kernel,
        "accel": args.accel,
        "boot_s": [],
        "snapshot_s": [],
        "state_bytes": [],
        "restore_s": [],
    }
    vms: list[Vm] = []
    try:
        for run in range(args.runs):
            disk = overlay(work / f"boot{run}.qcow2", image / "rootfs.ext4", "raw")
            vm = Vm(image, work, f"boot{run}", disk, **common)
            vms.append(vm)
            if run == 0:
                result["qemu_argv"] = vm.argv
            seconds, answer = vm.wait_ready(args.timeout)
            result["boot_s"].append(round(seconds, 3))
            clock = guest_clock(answer)
            skew = f", guest clock {clock[0] - time.time():+.0f} s vs host" if clock else ""
            print(f"boot {run}: boot -> ready {seconds:.2f} s ({answer.splitlines()[0][:60]!r}{skew})", flush=True)
            if args.no_snapshot:
                vm.quit()
                continue
            state = work / f"boot{run}.state"
            seconds, size = snapshot(vm, state)
            result["snapshot_s"].append(round(seconds, 3))
            result["state_bytes"].append(size)
            print(f"boot {run}: snapshot (stop + migrate to file) {seconds:.2f} s, {size / 1e6:.1f} MB", flush=True)
            snap_time = time.time()
            vm.quit()
            time.sleep(args.restore_delay)
            # The snapshot's disk is now frozen; each restored clone writes to its own overlay.
            clone_disk = overlay(work / f"restore{run}.qcow2", disk, "qcow2")
            clone = Vm(image, work, f"restore{run}", clone_disk, incoming=f"exec:cat {state}", **common)
            vms.append(clone)
            loaded = resume_after_incoming(clone, args.timeout)
            seconds, answer = clone.wait_ready(args.timeout)
            status = clone.control().execute("query-status")
            result["restore_s"].append(round(seconds, 3))
            clock = guest_clock(answer)
            skew = (
                f", guest clock {clock[0] - time.time():+.0f} s vs host (snapshot taken {time.time() - snap_time:.0f} s ago)"
                if clock
                else ""
            )
            print(
                f"boot {run}: restore -> ready {seconds:.2f} s (state loaded in {loaded:.2f} s, "
                f"status {status['status']}{skew})",
                flush=True,
            )
            result.setdefault("restore_loaded_s", []).append(round(loaded, 3))
            clone.quit()
    finally:
        for vm in vms:
            if vm.proc.poll() is None:
                vm.quit()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    for key in ("boot_s", "restore_s", "snapshot_s"):
        if result[key]:
            result[key.replace("_s", "_p50_s")] = round(statistics.median(result[key]), 3)
    if result.get("boot_p50_s") and result.get("restore_p50_s"):
        result["boot_over_restore"] = round(result["boot_p50_s"] / result["restore_p50_s"], 2)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        print(
            f"tsc_early_khz={tsc_khz} lpj={result['lpj']} (HZ={hz}); "
            + ", ".join(f"{k}={result[k]}" for k in ("boot_p50_s", "restore_p50_s", "boot_over_restore") if k in result)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
