"""Host-side resources of a Firecracker VM: its network namespace with the TAP, its jail
cgroups, its directory; and the reaper that removes them after a crash.

Every VM gets ``ip netns add <prefix><id>`` with a TAP named ``tap0`` inside, addressed
172.16.0.1/30 (the guest is 172.16.0.2).  Because the names and addresses are the same in
every namespace, a snapshot (which records the TAP name) restores into any clone's namespace.

No egress by default: the namespace has only the TAP.  With ``egress``: a veth pair to the
host (10.201.x.y/30 per VM), a default route through it, and NAT twice: MASQUERADE in the
namespace (guest -> veth) and on the host (veth subnet -> the world, tagged with a comment
so the reaper finds it); this also turns on the host's net.ipv4.ip_forward.  The /30 and the
veth name derive from the namespace name (crc32); a /30 already on the host is skipped.
Teardown deletes the namespace (which takes the TAP and the veth
pair with it) and the host rules; it is idempotent.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import subprocess
import zlib
from dataclasses import dataclass

import trio

from marathon.errors import SandboxError
from marathon.node.procs import kill_tree

log = logging.getLogger("marathon.sandbox.firecracker")

DEFAULT_PREFIX = "mfc-"  # VM ids, network namespaces, jail ids all start with it
MARKER = "fc-vm.json"  # in every VM directory: what to clean up after a crash
CLEANUP_TIMEOUT = 15.0

NETNS_DIR = "/run/netns"
TAP = "tap0"
TAP_HOST_IP = "172.16.0.1"
GUEST_IP = "172.16.0.2"
PREFIX_LEN = 30
GUEST_MAC = "06:00:ac:10:00:02"
RULE_TAG = "marathon-fc"
_SUBNET_LOCK = trio.Lock()


@dataclass
class VMNet:
    netns: str
    tap: str = TAP
    guest_ip: str = GUEST_IP
    gateway: str = TAP_HOST_IP
    prefix_len: int = PREFIX_LEN
    guest_mac: str = GUEST_MAC
    host_veth: str = ""  # empty: no egress
    veth_subnet: str = ""

    @property
    def netns_path(self) -> str:
        return os.path.join(NETNS_DIR, self.netns)

    def boot_args(self) -> str:
        """What the guest image's init reads (``marathon.ip=``/``marathon.gw=``)."""
        args = f"marathon.ip={self.guest_ip}/{self.prefix_len}"
        return args + (f" marathon.gw={self.gateway}" if self.host_veth else "")


async def run(cmd: list[str], *, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    try:
        with trio.fail_after(timeout):
            res = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    except trio.TooSlowError:
        raise SandboxError(f"{' '.join(cmd)}: timed out after {timeout:.0f}s") from None
    except OSError as exc:
        raise SandboxError(f"{cmd[0]}: {exc}") from None
    if check and res.returncode != 0:
        raise SandboxError(f"{' '.join(cmd)}: {res.stderr.decode(errors='replace').strip()[:400]}")
    return res


def list_netns(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def veth_name(netns: str) -> str:
    """A host-side interface name (<= 15 chars) derived from the namespace name."""
    return f"mfc{zlib.crc32(netns.encode()):08x}"


def veth_subnet(netns: str, taken: set[str] | frozenset[str] = frozenset()) -> tuple[str, str, str]:
    """(subnet, host ip, namespace ip): a /30 in 10.201.0.0/16, starting from one derived from
    the name and skipping those whose host address is in ``taken``."""
    start = zlib.crc32(netns.encode()) % (1 << 14)
    for i in range(1 << 14):
        b, c = divmod(((start + i) % (1 << 14)) * 4, 256)
        if f"10.201.{b}.{c + 1}" not in taken:
            return f"10.201.{b}.{c}/30", f"10.201.{b}.{c + 1}", f"10.201.{b}.{c + 2}"
    raise SandboxError("no free /30 left in 10.201.0.0/16 for a VM's veth")


async def host_ipv4_addresses() -> set[str]:
    res = await run(["ip", "-o", "-4", "addr", "show"], check=False)
    return {w.split("/")[0] for line in res.stdout.decode().splitlines() for w in line.split()[3:4]}


async def setup_net(netns: str, *, egress: bool = False) -> VMNet:
    """Create the namespace with its TAP (and the veth + NAT when ``egress``).  On failure,
    everything made so far is removed before the error propagates."""
    if shutil.which("ip") is None:
        raise SandboxError("the ip command (Debian package iproute2) is needed for Firecracker networking")
    net = VMNet(netns=netns)
    await run(["ip", "netns", "add", netns])
    try:
        ns = ["ip", "-n", netns]
        await run(ns + ["link", "set", "lo", "up"])
        await run(ns + ["tuntap", "add", "dev", TAP, "mode", "tap"])
        await run(ns + ["addr", "add", f"{TAP_HOST_IP}/{PREFIX_LEN}", "dev", TAP])
        await run(ns + ["link", "set", TAP, "up"])
        if egress:
            await _setup_egress(net)
    except BaseException:
        with trio.CancelScope(shield=True):
            await teardown_net(net)
        raise
    return net


async def _setup_egress(net: VMNet) -> None:
    if shutil.which("iptables") is None:
        raise SandboxError("egress needs iptables on the host")
    hv = veth_name(net.netns)
    ns = ["ip", "-n", net.netns]
    await run(["ip", "link", "add", hv, "type", "veth", "peer", "name", "veth0", "netns", net.netns])
    net.host_veth = hv
    async with _SUBNET_LOCK:  # choose and claim a /30 atomically within this process
        subnet, host_ip, ns_ip = veth_subnet(net.netns, await host_ipv4_addresses())
        await run(["ip", "addr", "add", f"{host_ip}/30", "dev", hv])
    net.veth_subnet = subnet
    await run(["ip", "link", "set", hv, "up"])
    await run(ns + ["addr", "add", f"{ns_ip}/30", "dev", "veth0"])
    await run(ns + ["link", "set", "veth0", "up"])
    await run(ns + ["route", "add", "default", "via", host_ip])
    nsexec = ["ip", "netns", "exec", net.netns]
    await run(nsexec + ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    await run(nsexec + ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "veth0", "-j", "MASQUERADE"])
    await run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    for table, *rule in _host_rules(net):
        await run(["iptables", "-t", table, "-A"] + rule)


def _host_rules(net: VMNet) -> list[list[str]]:
    tag = ["-m", "comment", "--comment", f"{RULE_TAG}:{net.netns}"]
    return [
        ["nat", "POSTROUTING", "-s", net.veth_subnet, "!", "-o", net.host_veth, "-j", "MASQUERADE"] + tag,
        ["filter", "FORWARD", "-i", net.host_veth, "-j", "ACCEPT"] + tag,
        ["filter", "FORWARD", "-o", net.host_veth, "-m", "state", "--state", "RELATED,ESTABLISHED", "-j", "ACCEPT"]
        + tag,
    ]


async def teardown_net(net: VMNet | str) -> None:
    """Remove the namespace (TAP and veth go with it) and our host rules.  Idempotent."""
    name = net if isinstance(net, str) else net.netns
    await remove_host_rules(f"{RULE_TAG}:{name}")
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        await run(["ip", "netns", "delete", name], check=False)
    hv = veth_name(name)
    if os.path.exists(f"/sys/class/net/{hv}"):  # normally gone with its peer
        await run(["ip", "link", "delete", hv], check=False)


async def remove_host_rules(tag_prefix: str) -> None:
    """Delete every iptables rule whose comment starts with ``tag_prefix``."""
    if shutil.which("iptables") is None:
        return
    for table in ("nat", "filter"):
        res = await run(["iptables", "-t", table, "-S"], check=False)
        for line in res.stdout.decode(errors="replace").splitlines():
            if f'--comment "{tag_prefix}' not in line and f"--comment {tag_prefix}" not in line:
                continue
            if not line.startswith("-A "):
                continue
            # "-A CHAIN ..." -> "-D CHAIN ..." (iptables -S quotes the comment: split like a shell)
            args = shlex.split(line)
            await run(["iptables", "-t", table, "-D"] + args[1:], check=False)


def _cgroup_mounts() -> list[tuple[str, str]]:
    out = []
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
                    out.append((parts[2], parts[1]))
    except OSError:
        pass
    return out


def cgroup_version() -> int:
    kinds = {k for k, _ in _cgroup_mounts()}
    return 2 if kinds == {"cgroup2"} else 1


async def remove_cgroups(parent: str, vm_id: str, *, timeout: float = 2.0) -> None:
    """rmdir the VM's cgroup in every hierarchy.  A cgroup stays busy until its last process
    is reaped (by us, or by init for an orphan), so EBUSY is retried for a bounded time."""
    for _, mnt in _cgroup_mounts():
        path = os.path.join(mnt, parent, vm_id)
        with trio.move_on_after(timeout):
            while os.path.isdir(path):
                try:
                    os.rmdir(path)
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        log.warning("could not remove cgroup %s: %s", path, exc)
                        break
                    await trio.sleep(0.01)
        if os.path.isdir(path):
            log.warning("could not remove cgroup %s: still busy", path)


def stale_cgroups(parent: str, prefix: str) -> list[str]:
    """Cgroup directories of jailed VMs named with our prefix, in every hierarchy."""
    out = []
    for _, mnt in _cgroup_mounts():
        base = os.path.join(mnt, parent)
        if os.path.isdir(base):
            out += [os.path.join(base, d) for d in os.listdir(base) if d.startswith(prefix)]
    return out


async def cleanup_vm_dir(vm_dir: str, *, id: str, jail_dir: str, netns: str, parent_cgroup: str) -> None:
    """Remove what a VM made on the host (its process must be gone already)."""
    if netns:
        await teardown_net(netns)
    if parent_cgroup:
        await remove_cgroups(parent_cgroup, id)
    if jail_dir:
        await trio.to_thread.run_sync(lambda: shutil.rmtree(jail_dir, ignore_errors=True))
    await trio.to_thread.run_sync(lambda: shutil.rmtree(vm_dir, ignore_errors=True))


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else ""


def find_stale_vmms(run_root: str, prefix: str) -> list[int]:
    """Firecracker (or jailer) processes that are ours: ``--id <prefix>…`` or an API socket
    under ``run_root``."""
    root = os.path.abspath(run_root).rstrip("/") + "/"
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (1, os.getpid()):
            continue
        argv = _cmdline(int(entry))
        if not argv or os.path.basename(argv[0]) not in ("firecracker", "jailer"):
            continue
        if _arg(argv, "--id").startswith(prefix) or _arg(argv, "--api-sock").startswith(root):
            out.append(int(entry))
    return out


async def reap_leftovers(
    run_root: str, *, prefix: str = DEFAULT_PREFIX, parent_cgroup: str = "firecracker"
) -> list[str]:
    """At node start: kill our stale VMMs, remove their VM directories under ``run_root``
    (found by their marker file), jails, cgroups, network namespaces and host NAT rules.
    Returns what was removed."""
    removed: list[str] = []
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT * 2):
        for pid in find_stale_vmms(run_root, prefix):
            await kill_tree(pid)
            removed.append(f"process {pid}")
        markers = []
        if os.path.isdir(run_root):
            for dirpath, dirnames, filenames in os.walk(run_root):
                if MARKER in filenames:
                    markers.append(dirpath)
                    dirnames[:] = []
        for vm_dir in markers:
            try:
                with open(os.path.join(vm_dir, MARKER)) as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                doc = {}
            await cleanup_vm_dir(
                vm_dir,
                id=doc.get("id", ""),
                jail_dir=doc.get("jail_dir", ""),
                netns=doc.get("netns", ""),
                parent_cgroup=doc.get("parent_cgroup", ""),
            )
            removed.append(f"dir {vm_dir}")
        for path in stale_cgroups(parent_cgroup, prefix):
            await remove_cgroups(parent_cgroup, os.path.basename(path))
            removed.append(f"cgroup {path}")
        for ns in list_netns(prefix):
            await teardown_net(ns)
            removed.append(f"netns {ns}")
        await remove_host_rules(f"marathon-fc:{prefix}")
    if removed:
        log.info("reaped firecracker leftovers: %s", ", ".join(removed))
    return removed
