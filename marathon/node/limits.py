"""What a task gets: its own limits where it asked, the node's defaults elsewhere, never more
than the node's maxima (pure)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from marathon.config import Config
from marathon.node.cgroups import Limits
from marathon.protocol import messages as m
from marathon.units import format_size


@dataclass(frozen=True)
class TaskResources:
    limits: Limits
    disk: int | None  # bytes; None: no cap
    notes: list[str] = field(default_factory=list)  # what was capped at a maximum, for the task's log


def resolve(config: Config, spec: m.TaskSpec, *, host_cpus: int | None = None) -> TaskResources:
    notes: list[str] = []
    host_cpus = host_cpus or os.cpu_count() or 1
    max_cpus = config.max_cpus or float(host_cpus)
    assert isinstance(config.max_memory, int) and isinstance(config.default_memory, int)
    assert isinstance(config.max_disk, int) and isinstance(config.default_disk, int)

    def capped(asked, default, maximum, what: str, fmt):
        value = asked if asked is not None else default
        if value > maximum:
            notes.append(f"{what} {fmt(value)} is above this node's maximum: {fmt(maximum)}")
            value = maximum
        return value

    memory = capped(spec.request.size("memory_limit"), config.default_memory, config.max_memory, "memory", format_size)
    cpus = capped(spec.request.cpu_limit, min(config.default_cpus, max_cpus), max_cpus, "cpus", lambda v: f"{v:g}")
    disk = capped(spec.request.size("disk_limit"), config.default_disk, config.max_disk, "disk", format_size)
    limits = Limits(memory=memory, pids=config.default_pids, cpus=cpus)
    return TaskResources(limits, None if config.disk_limit == "off" else disk, notes)
