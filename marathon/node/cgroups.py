"""Per-sandbox resource limits with cgroups, v2 (unified) or v1 (one hierarchy per controller).

``Cgroups.detect()`` finds, once at node start, where this node may create cgroups and which
limits it can enforce there (memory, pids, cpu), and says why not for the others.  Each
sandbox then gets its own group below the node's (``<own cgroup>/marathon-<node id>/<name>``),
entered by the sandbox's root process before it execs (``spawn(enter=...)``), so everything the
task starts is counted and nothing escapes.  The node reads the group's event counters to tell
a task why a process died (``oom_kill``, ``pids`` limit hits).

v2 with delegation (systemd ``Delegate=yes``, or root): the controllers must be enabled in the
parent's ``cgroup.subtree_control``; a cgroup that holds processes cannot enable them ("no
internal processes"), so the node first moves itself into a ``node`` leaf of its own group.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
from dataclasses import dataclass, field

import trio

from marathon.units import format_size

log = logging.getLogger("marathon.cgroups")
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    memory: int | None = None  # bytes
    pids: int | None = None
    cpus: float | None = None  # cores (quota over a 100 ms period)

    def describe(self) -> str:
        parts = []
        if self.memory:
            parts.append(f"memory {format_size(self.memory)}")
        if self.pids:
            parts.append(f"{self.pids} processes")
        if self.cpus:
            parts.append(f"{self.cpus:g} CPUs")
        return ", ".join(parts) or "none"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.strip().isdigit():
            return int(v)
    return 0


def mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of every cgroup mount in /proc/self/mountinfo."""
    out = []
    for line in mountinfo.splitlines():
        pre, _, post = line.partition(" - ")
        fields, rest = pre.split(), post.split()
        if len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((fields[4].replace("\\040", " "), rest[0], set(rest[2].split(","))))
    return out


def own_paths(proc_cgroup: str) -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out = {}
    for line in proc_cgroup.splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


@dataclass
class Group:
    """One sandbox's cgroup (in one or, for v1, several hierarchies)."""

    version: int
    dirs: dict[str, str]  # controller -> directory ("" for v2's single directory)
    limits: Limits

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def _dir(self, controller: str) -> str | None:
        return self.dirs.get("") or self.dirs.get(controller)

    def oom_kills(self) -> int:
        d = self._dir("memory")
        if d is None:
            return 0
        if self.version == 2:
            return _counter(_read(os.path.join(d, "memory.events")), "oom_kill")
        return _counter(_read(os.path.join(d, "memory.oom_control")), "oom_kill")

    def pids_limit_hits(self) -> int:
        d = self._dir("pids")
        return 0 if d is None else _counter(_read(os.path.join(d, "pids.events")), "max")

    def memory_peak(self) -> int:
        d = self._dir("memory")
        if d is None:
            return 0
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        text = _read(os.path.join(d, name)).strip()
        return int(text) if text.isdigit() else 0

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files:
            out |= {int(p) for p in _read(f).split() if p.isdigit()}
        return out

    async def destroy(self, timeout: float = 5.0) -> None:
        """Kill everything in the group and remove it (shielded, bounded, idempotent)."""
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            delay = 0.002
            while True:
                if self.version == 2 and self.dirs.get(""):
                    with contextlib.suppress(OSError):
                        _write(os.path.join(self.dirs[""], "cgroup.kill"), "1")
                pids = self.pids()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                if not pids and self._rmdir():
                    return
                await trio.sleep(delay)
                delay = min(delay * 2, 0.05)
        log.warning("cgroup %s: could not remove it within %.0fs", self.dirs, timeout)

    def _rmdir(self) -> bool:
        done = True
        for d in dict.fromkeys(self.dirs.values()):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.debug("cgroup rmdir %s: %s", d, exc)
                done = False
        return done


@dataclass
class Cgroups:
    """Where this node puts sandbox cgroups and what it can enforce there."""

    version: int  # 2, 1, or 0 (none usable)
    parents: dict[str, str] = field(default_factory=dict)  # controller ("" on v2) -> parent directory
    enforced: tuple[str, ...] = ()
    missing: dict[str, str] = field(default_factory=dict)  # controller -> why it cannot be enforced

    @classmethod
    def detect(
        cls,
        node_id: str,
        *,
        mountinfo: str | None = None,
        proc_cgroup: str | None = None,
        prefer: str = "auto",
        setup: bool = True,
    ) -> Cgroups:
        """``prefer``: auto | v2 | v1 | off.  ``setup`` creates the node's parent group(s) (and
        on v2 moves this process into a leaf so controllers can be delegated)."""
        if prefer == "off":
            return cls(0, missing={c: "limits are off (limits = off)" for c in CONTROLLERS})
        mi = _read("/proc/self/mountinfo") if mountinfo is None else mountinfo
        pc = _read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup
        found, own = mounts(mi), own_paths(pc)
        name = f"marathon-{node_id}"
        tries = []
        if prefer in ("auto", "v2"):
            tries.append(cls._v2)
        if prefer in ("auto", "v1"):
            tries.append(cls._v1)
        best: Cgroups | None = None
        for attempt in tries:
            cand = attempt(found, own, name, setup)
            if best is None or len(cand.enforced) > len(best.enforced):
                best = cand
        return best or cls(0, missing={c: "no cgroup file system mounted" for c in CONTROLLERS})

    @classmethod
    def _v2(cls, found, own, name: str, setup: bool) -> Cgroups:
        mount = next((p for p, t, _ in found if t == "cgroup2"), None)
        if mount is None:
            return cls(2, missing={c: "no cgroup2 mount" for c in CONTROLLERS})
        base = os.path.join(mount, own.get("", "/").lstrip("/"))
        available = set(_read(os.path.join(base, "cgroup.controllers")).split())
        missing = {c: f"the {c} controller is not available in {base} (bound to cgroup v1 or not delegated)"
                   for c in CONTROLLERS if c not in available}  # fmt: skip
        wanted = [c for c in CONTROLLERS if c in available]
        if not wanted:
            return cls(2, missing=missing)
        if not os.access(base, os.W_OK):
            return cls(2, missing={c: f"{base} is not writable by this user (delegate it: systemd Delegate=yes)"
                                   for c in CONTROLLERS})  # fmt: skip
        parent = os.path.join(base, name)
        if setup:
            try:
                enabled = set(_read(os.path.join(base, "cgroup.subtree_control")).split())
                if not set(wanted) <= enabled:
                    if _read(os.path.join(base, "cgroup.procs")).split() and base.rstrip("/") != mount.rstrip("/"):
                        leaf = os.path.join(base, "node")  # "no internal processes": leave room for children
                        os.makedirs(leaf, exist_ok=True)
                        for pid in _read(os.path.join(base, "cgroup.procs")).split():
                            with contextlib.suppress(OSError):
                                _write(os.path.join(leaf, "cgroup.procs"), pid)
                    _write(os.path.join(base, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))
                os.makedirs(parent, exist_ok=True)
                _write(os.path.join(parent, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))
            except OSError as exc:
                return cls(2, missing={c: f"cannot delegate {c} below {base}: {exc}" for c in CONTROLLERS})
        return cls(2, parents={"": parent}, enforced=tuple(wanted), missing=missing)

    @classmethod
    def _v1(cls, found, own, name: str, setup: bool) -> Cgroups:
        parents, missing = {}, {}
        for c in CONTROLLERS:
            mount = next((p for p, t, opts in found if t == "cgroup" and c in opts), None)
            if mount is None:
                missing[c] = f"no cgroup v1 hierarchy with the {c} controller"
                continue
            base = os.path.join(mount, own.get(c, "/").lstrip("/"))
            if not os.access(base, os.W_OK):
                missing[c] = f"{base} is not writable by this user"
                continue
            parent = os.path.join(base, name)
            if setup:
                try:
                    os.makedirs(parent, exist_ok=True)
                except OSError as exc:
                    missing[c] = f"cannot create {parent}: {exc}"
                    continue
            parents[c] = parent
        return cls(1, parents=parents, enforced=tuple(c for c in CONTROLLERS if c in parents), missing=missing)

    def describe(self) -> str:
        if not self.enforced:
            return "no resource limits can be enforced here: " + "; ".join(sorted(set(self.missing.values())))
        text = f"cgroup v{self.version}: {', '.join(self.enforced)} limits enforced"
        if self.missing:
            text += "; not enforced: " + "; ".join(f"{c} ({why})" for c, why in self.missing.items())
        return text

    def create(self, name: str, limits: Limits) -> Group | None:
        """A group for one sandbox with ``limits`` applied (None when nothing is enforced).
        Raises OSError when the group cannot be made."""
        if not self.enforced:
            return None
        if self.version == 2:
            d = os.path.join(self.parents[""], name)
            group = Group(2, {"": d}, limits)
            os.makedirs(d, exist_ok=True)
            try:
                self._limit_v2(d, limits)
            except OSError:
                group._rmdir()
                raise
            return group
        dirs = {c: os.path.join(p, name) for c, p in self.parents.items()}
        group = Group(1, dirs, limits)
        try:
            for d in dirs.values():
                os.makedirs(d, exist_ok=True)
            self._limit_v1(dirs, limits)
        except OSError:
            group._rmdir()
            raise
        return group

    def _limit_v2(self, d: str, limits: Limits) -> None:
        if "memory" in self.enforced and limits.memory:
            _write(os.path.join(d, "memory.max"), str(limits.memory))
            with contextlib.suppress(OSError):  # no swap accounting on this kernel: nothing to turn off
                _write(os.path.join(d, "memory.swap.max"), "0")
            with contextlib.suppress(OSError):
                _write(os.path.join(d, "memory.oom.group"), "0")  # kill the process, not the whole task
        if "pids" in self.enforced and limits.pids:
            _write(os.path.join(d, "pids.max"), str(limits.pids))
        if "cpu" in self.enforced and limits.cpus:
            _write(os.path.join(d, "cpu.max"), f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")

    def _limit_v1(self, dirs: dict[str, str], limits: Limits) -> None:
        if "memory" in dirs and limits.memory:
            _write(os.path.join(dirs["memory"], "memory.limit_in_bytes"), str(limits.memory))
            memsw = os.path.join(dirs["memory"], "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                _write(memsw, str(limits.memory))
        if "pids" in dirs and limits.pids:
            _write(os.path.join(dirs["pids"], "pids.max"), str(limits.pids))
        if "cpu" in dirs and limits.cpus:
            _write(os.path.join(dirs["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(dirs["cpu"], "cpu.cfs_quota_us"), str(int(limits.cpus * CPU_PERIOD_US)))

    async def reap(self) -> list[str]:
        """At node start: kill and remove every sandbox group a previous run of this node left."""
        removed = []
        by_name: dict[str, dict[str, str]] = {}
        for c, parent in self.parents.items():
            with contextlib.suppress(OSError):
                for entry in os.scandir(parent):
                    if entry.is_dir():
                        by_name.setdefault(entry.name, {})[c] = entry.path
        for name, dirs in by_name.items():
            await Group(self.version, dirs, Limits()).destroy()
            removed.append(name)
        return removed
