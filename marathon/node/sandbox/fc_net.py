"""Per-VM networking for Firecracker: a network namespace of its own holding the TAP.

Every VM gets ``ip netns add <prefix><id>`` with a TAP named ``tap0`` inside, addressed
172.16.0.1/30 (the guest is 172.16.0.2).  Because the names and addresses are the same in
every namespace, a snapshot (which records the TAP name) restores into any clone's namespace.

No egress by default: the namespace has only the TAP.  With ``egress``: a veth pair to the
host (10.201.x.y/30 per VM), a default route through it, and NAT twice: MASQUERADE in the
namespace (guest -> veth) and on the host (veth subnet -> the world, tagged with a comment
so the reaper finds it).  Teardown deletes the namespace (which takes the TAP and the veth
pair with it) and the host rules; it is idempotent.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import zlib
from dataclasses import dataclass

import trio

from marathon.errors import SandboxError

NETNS_DIR = "/run/netns"
TAP = "tap0"
TAP_HOST_IP = "172.16.0.1"
GUEST_IP = "172.16.0.2"
PREFIX_LEN = 30
GUEST_MAC = "06:00:ac:10:00:02"
RULE_TAG = "marathon-fc"


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


def veth_subnet(netns: str) -> tuple[str, str, str]:
    """(subnet, host ip, namespace ip) of a /30 in 10.201.0.0/16, derived from the name."""
    n = zlib.crc32(netns.encode()) % (1 << 14)
    b, c = divmod(n * 4, 256)
    return f"10.201.{b}.{c}/30", f"10.201.{b}.{c + 1}", f"10.201.{b}.{c + 2}"


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
    subnet, host_ip, ns_ip = veth_subnet(net.netns)
    net.host_veth, net.veth_subnet = hv, subnet
    ns = ["ip", "-n", net.netns]
    await run(["ip", "link", "add", hv, "type", "veth", "peer", "name", "veth0", "netns", net.netns])
    await run(["ip", "addr", "add", f"{host_ip}/30", "dev", hv])
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
        ["filter", "FORWARD", "-o", net.host_veth, "-m", "state", "--state", "RELATED,ESTABLISHED", "-j", "ACCEPT"] + tag,
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
