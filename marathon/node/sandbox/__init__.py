"""Sandboxes: where an agent runs.  One interface, several backends.

A backend is asked, per task, for a sandbox with a workspace; it starts the agent inside
and says where the node can dial it.  Destroying a sandbox kills everything in it and
removes what it left on the host; it is shielded and bounded, and safe to call twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from marathon.node.cgroups import Group, Limits


@dataclass
class SandboxInfo:
    backend: str
    isolation: str  # a human description: "bubblewrap (mount, pid, net, ipc, uts namespaces)"
    warnings: list[str]


@dataclass(frozen=True)
class SandboxOptions:
    """What the node decided for one task's sandbox."""

    uid: int = 4242  # the slot's sandbox user (process backend)
    gid: int = 4242
    limits: Limits = field(default_factory=Limits)
    disk: int | None = None  # bytes: workspace + HOME + TMPDIR
    keep_workspace: bool = False  # the host keeps the workspace after the task (process backend, loop disk)


class Sandbox(Protocol):
    id: str
    agent_address: str  # where the node dials the agent
    workspace: str  # the workspace as the agent sees it
    host_workspace: str | None  # the workspace on the node, when it is visible there
    group: Group | None  # the cgroup the sandbox runs in (None: no limits enforced)
    start_fields: dict[str, Any]  # fields of the Start message this sandbox needs (uid, paths)

    def exited(self) -> int | None:
        """The sandbox's exit status once it has ended, else None."""

    def diagnostics(self) -> str:
        """A short tail of what the sandbox printed (for failure messages)."""

    async def destroy(self) -> None: ...


class SandboxBackend(Protocol):
    name: str
    info: SandboxInfo

    async def create(self, task_id: str, run_dir: str, options: SandboxOptions = SandboxOptions()) -> Sandbox: ...

    async def aclose(self) -> None: ...
