"""The sandbox's seccomp filter: a classic-BPF program, built here, loaded by bubblewrap
(``--seccomp FD``) just before it execs the agent, so it binds the agent, Claude Code and
everything they start.

In the spirit of Docker's default profile: everything is allowed except the kernel surface a
task has no business with.  Denied with EPERM (so programs see an ordinary "not permitted"):

- new namespaces of any kind: ``unshare`` and ``clone`` with a ``CLONE_NEW*`` flag, ``setns``
  (no nested user namespace with full capabilities inside the sandbox);
- ``clone3`` answers ENOSYS (its flags live in memory a filter cannot read; libc then falls back
  to ``clone``, whose flags it can);
- io_uring (``io_uring_setup``, ``_enter``, ``_register``);
- the kernel keyring (``keyctl``, ``add_key``, ``request_key``): keys would outlive the task;
- ``bpf``, ``perf_event_open``, ``userfaultfd``;
- mounting and the file-system API around it (``mount``, ``umount2``, ``pivot_root``,
  ``fsopen``, ``fsconfig``, ``fsmount``, ``fspick``, ``move_mount``, ``open_tree``,
  ``mount_setattr``), ``name_to_handle_at``/``open_by_handle_at``, ``quotactl``;
- reaching into other processes: ``ptrace``, ``process_vm_readv``/``writev``, ``pidfd_getfd``,
  ``process_madvise``, ``kcmp``;
- the machine itself: kernel modules, ``kexec_*``, ``reboot``, ``swapon``/``swapoff``,
  ``acct``, ``syslog``, clock and time setting, ``ioperm``/``iopl``, ``vhangup``, obsolete
  ``_sysctl``/``sysfs``/``ustat``/``uselib``/``nfsservctl``/``lookup_dcookie``.

Only the node's native ABI is allowed: on x86-64 the i386 (``int 0x80``) and x32 ABIs answer
ENOSYS, so a 32-bit binary cannot use a second syscall table to get around the list.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from dataclasses import dataclass

# BPF opcodes (linux/filter.h)
LD_W_ABS = 0x20
JMP_JEQ_K = 0x15
JMP_JGE_K = 0x35
JMP_JSET_K = 0x45
JMP_JA = 0x05
RET_K = 0x06
ALU_AND_K = 0x54

RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000

OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16  # struct seccomp_data (arg0's low 32 bits, little endian)

CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080
X32_BIT = 0x40000000

DENIED = (
    "setns", "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key",
    "request_key", "bpf", "perf_event_open", "userfaultfd", "mount", "umount2", "pivot_root", "fsopen",
    "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr", "name_to_handle_at",
    "open_by_handle_at", "quotactl", "quotactl_fd", "ptrace", "process_vm_readv", "process_vm_writev",
    "pidfd_getfd", "process_madvise", "kcmp", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "syslog", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "ioperm", "iopl", "vhangup", "_sysctl", "sysfs", "ustat", "uselib",
    "nfsservctl", "lookup_dcookie", "create_module", "get_kernel_syms", "query_module",
)  # fmt: skip


@dataclass(frozen=True)
class Abi:
    name: str
    audit_arch: int
    syscalls: dict[str, int]  # only the ones the filter names
    x32: bool = False


X86_64 = Abi("x86_64", 0xC000003E, x32=True, syscalls={
    "clone": 56, "clone3": 435, "unshare": 272, "setns": 308, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
    "perf_event_open": 298, "userfaultfd": 323, "mount": 165, "umount2": 166, "pivot_root": 155, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "mount_setattr": 442,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "quotactl": 179, "quotactl_fd": 443, "ptrace": 101,
    "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438, "process_madvise": 440, "kcmp": 312,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320,
    "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163, "syslog": 103, "settimeofday": 164,
    "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "ioperm": 173, "iopl": 172, "vhangup": 153,
    "_sysctl": 156, "sysfs": 139, "ustat": 136, "uselib": 134, "nfsservctl": 180, "lookup_dcookie": 212,
    "create_module": 174, "get_kernel_syms": 177, "query_module": 178,
})  # fmt: skip

AARCH64 = Abi("aarch64", 0xC00000B7, syscalls={
    "clone": 220, "clone3": 435, "unshare": 97, "setns": 268, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
    "perf_event_open": 241, "userfaultfd": 282, "mount": 40, "umount2": 39, "pivot_root": 41, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428, "mount_setattr": 442,
    "name_to_handle_at": 264, "open_by_handle_at": 265, "quotactl": 60, "quotactl_fd": 443, "ptrace": 117,
    "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438, "process_madvise": 440, "kcmp": 272,
    "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294,
    "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89, "syslog": 116, "settimeofday": 170,
    "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171, "vhangup": 58, "nfsservctl": 42,
    "lookup_dcookie": 18,
})  # fmt: skip

ABIS = {"x86_64": X86_64, "aarch64": AARCH64}


def native_abi() -> Abi | None:
    return ABIS.get(platform.machine())


def _insn(code: int, jt: int, jf: int, k: int) -> tuple[int, int, int, int]:
    return (code, jt, jf, k & 0xFFFFFFFF)


def program(abi: Abi) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions."""
    deny_eperm = RET_ERRNO | errno.EPERM
    deny_enosys = RET_ERRNO | errno.ENOSYS
    plain = sorted({abi.syscalls[n] for n in DENIED if n in abi.syscalls})
    nr_clone, nr_unshare, nr_clone3 = abi.syscalls["clone"], abi.syscalls["unshare"], abi.syscalls["clone3"]

    # layout (offsets are relative jumps: from the instruction after the jump)
    head = [
        _insn(LD_W_ABS, 0, 0, OFF_ARCH),
        _insn(JMP_JEQ_K, 1, 0, abi.audit_arch),
        _insn(RET_K, 0, 0, deny_enosys),  # a foreign ABI (i386 on x86-64)
        _insn(LD_W_ABS, 0, 0, OFF_NR),
    ]
    if abi.x32:
        head += [_insn(JMP_JGE_K, 0, 1, X32_BIT), _insn(RET_K, 0, 0, deny_enosys)]
    # after the chain: [ALLOW] [EPERM] [ENOSYS] [flags check: LD arg0; JSET CLONE_NEW -> EPERM; ALLOW]
    chain: list[tuple[str, int]] = [("clone3", nr_clone3), ("ns", nr_clone), ("ns", nr_unshare)]
    chain += [("eperm", nr) for nr in plain]
    n = len(chain)
    body = []
    for i, (kind, nr) in enumerate(chain):
        left = n - i - 1  # chain instructions after this one
        target = {"eperm": left + 1, "clone3": left + 2, "ns": left + 3}[kind]
        body.append(_insn(JMP_JEQ_K, target, 0, nr))
    tail = [
        _insn(RET_K, 0, 0, RET_ALLOW),  # +0: nothing matched
        _insn(RET_K, 0, 0, deny_eperm),  # +1
        _insn(RET_K, 0, 0, deny_enosys),  # +2
        _insn(LD_W_ABS, 0, 0, OFF_ARG0),  # +3: clone/unshare flags
        _insn(JMP_JSET_K, 0, 1, CLONE_NEW),
        _insn(RET_K, 0, 0, deny_eperm),
        _insn(RET_K, 0, 0, RET_ALLOW),
    ]
    return head + body + tail


def encode(insns: list[tuple[int, int, int, int]]) -> bytes:
    """struct sock_filter[] as the kernel (and bwrap --seccomp) takes it."""
    return b"".join(struct.pack("=HBBI", *i) for i in insns)


def filter_fd(abi: Abi | None = None) -> int:
    """A memfd holding the encoded filter, positioned at its start (for ``bwrap --seccomp FD``).
    The caller closes it once bwrap has started."""
    abi = abi or native_abi()
    if abi is None:
        raise OSError(f"no seccomp syscall table for {platform.machine()}")
    fd = os.memfd_create("marathon-seccomp", 0)
    os.write(fd, encode(program(abi)))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def run(insns: list[tuple[int, int, int, int]], *, arch: int, nr: int, arg0: int = 0) -> int:
    """Interpret the filter for one syscall (tests; the same semantics as the kernel's)."""
    data = {OFF_NR: nr & 0xFFFFFFFF, OFF_ARCH: arch, OFF_ARG0: arg0 & 0xFFFFFFFF}
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == LD_W_ABS:
            acc = data[k]
        elif code == ALU_AND_K:
            acc &= k
        elif code == JMP_JEQ_K:
            pc += jt if acc == k else jf
        elif code == JMP_JGE_K:
            pc += jt if acc >= k else jf
        elif code == JMP_JSET_K:
            pc += jt if acc & k else jf
        elif code == JMP_JA:
            pc += k
        elif code == RET_K:
            return k
        else:
            raise ValueError(f"unknown BPF opcode {code:#x}")
