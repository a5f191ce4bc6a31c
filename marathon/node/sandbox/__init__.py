"""Sandboxes: where an agent runs.  One interface, several backends.

A backend is asked, per task, for a sandbox with a workspace; it starts the agent inside
and says where the node can dial it.  Destroying a sandbox kills everything in it and
removes what it left on the host; it is shielded and bounded, and safe to call twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class SandboxInfo:
    backend: str
    isolation: str  # a human description: "bubblewrap (mount, pid, net, ipc, uts namespaces)"
    warnings: list[str]


class Sandbox(Protocol):
    id: str
    agent_address: str  # where the node dials the agent
    workspace: str  # the workspace as the agent sees it

    def exited(self) -> int | None:
        """The sandbox's exit status once it has ended, else None."""

    def diagnostics(self) -> str:
        """A short tail of what the sandbox printed (for failure messages)."""

    async def destroy(self) -> None: ...


class SandboxBackend(Protocol):
    name: str
    info: SandboxInfo

    async def create(self, task_id: str, workspace_host: str, run_dir: str) -> Sandbox: ...

    async def aclose(self) -> None: ...
