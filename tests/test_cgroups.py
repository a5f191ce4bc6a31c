"""cgroups: detection, limits and counters for v2 and v1, on synthetic cgroup trees (this host's
controllers are bound to v1, so v2 cannot be enforced here; the real v1 hierarchy is exercised by
tests/test_limits.py).  Plus the pure parts: sizes, the limits a task gets, the seccomp filter."""

from __future__ import annotations

import pytest

from marathon.config import load_config
from marathon.node import seccomp
from marathon.node.cgroups import Cgroups, Limits, mounts, own_paths
from marathon.node.limits import resolve
from marathon.protocol import messages as m
from marathon.units import format_size, parse_size

GiB = 1024**3


def fake_v2(root, own="/system.slice/marathon-node.service", controllers="cpuset cpu io memory pids"):
    base = root / own.lstrip("/")
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text(controllers + "\n")
    (base / "cgroup.subtree_control").write_text("")
    (base / "cgroup.procs").write_text("123\n456\n")
    mountinfo = f"30 24 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw\n"
    return base, mountinfo, f"0::{own}\n"


def test_v2_delegation_moves_the_node_to_a_leaf_and_enables_controllers(tmp_path):
    base, mountinfo, proc = fake_v2(tmp_path)
    cg = Cgroups.detect("n1", mountinfo=mountinfo, proc_cgroup=proc)
    assert cg.version == 2 and cg.enforced == ("memory", "pids", "cpu") and not cg.missing
    assert (base / "node" / "cgroup.procs").read_text() == "456"  # the node left its group's root
    assert (base / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    parent = base / "marathon-n1"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    group = cg.create("sandbox-t1", Limits(memory=4 * GiB, pids=1024, cpus=1.5))
    assert group is not None
    d = parent / "sandbox-t1"
    assert group.procs_files == [str(d / "cgroup.procs")]
    assert (d / "memory.max").read_text() == str(4 * GiB)
    assert (d / "memory.swap.max").read_text() == "0" and (d / "memory.oom.group").read_text() == "0"
    assert (d / "pids.max").read_text() == "1024" and (d / "cpu.max").read_text() == "150000 100000"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    (d / "pids.events").write_text("max 31\n")
    assert group.oom_kills() == 2 and group.pids_limit_hits() == 31


def test_v2_without_the_controllers_says_why(tmp_path):
    _, mountinfo, proc = fake_v2(tmp_path, controllers="hugetlb")
    cg = Cgroups.detect("n1", mountinfo=mountinfo, proc_cgroup=proc, prefer="v2")
    assert cg.enforced == () and "memory controller is not available" in cg.describe()
    assert cg.create("x", Limits(memory=GiB)) is None


def test_v1_one_hierarchy_per_controller(tmp_path):
    mi, pc = "", ""
    for i, c in enumerate(("memory", "pids", "cpu,cpuacct")):
        (tmp_path / c / "box").mkdir(parents=True)
        mi += f"{40 + i} 24 0:{30 + i} / {tmp_path / c} rw - cgroup cgroup rw,{c}\n"
        pc += f"{i + 1}:{c}:/box\n"
    cg = Cgroups.detect("n2", mountinfo=mi, proc_cgroup=pc, prefer="v1")
    assert cg.version == 1 and cg.enforced == ("memory", "pids", "cpu")
    (tmp_path / "memory" / "box" / "marathon-n2" / "s").mkdir()
    (tmp_path / "memory" / "box" / "marathon-n2" / "s" / "memory.memsw.limit_in_bytes").write_text("")
    group = cg.create("s", Limits(memory=GiB, pids=64, cpus=0.5))
    assert group is not None
    mem = tmp_path / "memory" / "box" / "marathon-n2" / "s"
    assert (mem / "memory.limit_in_bytes").read_text() == str(GiB)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(GiB)  # no swapping around the limit
    assert (tmp_path / "pids" / "box" / "marathon-n2" / "s" / "pids.max").read_text() == "64"
    cpu = tmp_path / "cpu,cpuacct" / "box" / "marathon-n2" / "s"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000" and (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert len(group.procs_files) == 3
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert group.oom_kills() == 3


def test_parsing_helpers():
    found = mounts(
        "30 24 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n31 24 0:27 / /x rw - ext4 /dev/vda rw\n"
    )
    assert found == [("/sys/fs/cgroup/unified", "cgroup2", {"rw"})]
    assert own_paths("4:memory:/a/b\n1:cpu,cpuacct:/\n0::/c\n") == {
        "memory": "/a/b",
        "cpu": "/",
        "cpuacct": "/",
        "": "/c",
    }
    assert parse_size("4GiB") == 4 * GiB == parse_size("4g") == parse_size(4 * GiB)
    assert parse_size("1.5G") == int(1.5 * GiB) and parse_size("512M") == 512 * 1024**2
    with pytest.raises(ValueError):
        parse_size("lots")
    assert format_size(4 * GiB) == "4 GiB" and format_size(768 * 1024**2) == "768 MiB"


def test_a_task_gets_its_limits_within_the_node_maxima(tmp_path):
    config = load_config({"data_dir": str(tmp_path), "max_memory": "8GiB", "max_cpus": 4, "max_disk": "20GiB"}, env={})
    spec = m.TaskSpec(task_id="a" * 12, request=m.TaskRequest(prompt="x"))
    r = resolve(config, spec, host_cpus=8)
    assert r.limits == Limits(memory=4 * GiB, pids=1024, cpus=2.0) and r.disk == 10 * GiB and not r.notes
    asked = m.TaskSpec(
        task_id="a" * 12, request=m.TaskRequest(prompt="x", memory_limit=32 * GiB, cpu_limit=1.0, disk_limit=50 * GiB)
    )
    r = resolve(config, asked, host_cpus=8)
    assert r.limits.memory == 8 * GiB and r.limits.cpus == 1.0 and r.disk == 20 * GiB
    assert [n.split()[0] for n in r.notes] == ["memory", "disk"]
    off = load_config({"data_dir": str(tmp_path), "disk_limit": "off"}, env={})
    assert resolve(off, spec).disk is None


def test_the_seccomp_filter_denies_what_it_lists_and_allows_the_rest():
    for abi in seccomp.ABIS.values():
        prog = seccomp.program(abi)

        def run(nr, arg0=0, arch=abi.audit_arch, prog=prog):
            return seccomp.run(prog, arch=arch, nr=nr, arg0=arg0)

        eperm = seccomp.RET_ERRNO | 1
        for name in seccomp.DENIED:
            if name in abi.syscalls:
                assert run(abi.syscalls[name]) == eperm, (abi.name, name)
        assert run(abi.syscalls["clone3"]) == seccomp.RET_ERRNO | 38  # ENOSYS: libc falls back to clone
        assert run(abi.syscalls["clone"], 0x01200011) == seccomp.RET_ALLOW  # fork / thread flags
        for flag in (
            0x10000000,
            0x20000000,
            0x40000000,
            0x00020000,
            0x00000080,
        ):  # NEWUSER, NEWPID, NEWNET, NEWNS, NEWTIME
            assert run(abi.syscalls["clone"], flag | 0x11) == eperm
            assert run(abi.syscalls["unshare"], flag) == eperm
        assert run(abi.syscalls["unshare"], 0x00000400) == seccomp.RET_ALLOW  # CLONE_FILES: harmless
        for nr in (0, 1, 2, 3, 9, 60, 231):  # read, write, open… (allowed on every table we carry)
            if nr not in abi.syscalls.values():
                assert run(nr) == seccomp.RET_ALLOW
        assert run(1, arch=0x40000003) == seccomp.RET_ERRNO | 38  # a foreign ABI
    assert (
        seccomp.run(seccomp.program(seccomp.X86_64), arch=seccomp.X86_64.audit_arch, nr=0x40000000 | 1)
        == seccomp.RET_ERRNO | 38
    )
