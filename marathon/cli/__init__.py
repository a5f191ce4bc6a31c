"""The ``marathon`` command.  Client commands are thin HTTP clients of the orchestrator; each
module registers its commands on the one app (``cli.app``)."""

from __future__ import annotations

import sys

from marathon.cli import accounts, admin, cluster, nodes, tasks, work  # noqa: F401  (they register their commands)
from marathon.cli.app import app, fail
from marathon.errors import MarathonError


def main() -> None:
    """Every command's errors end here: an API error or a bad setting is one line on stderr
    and exit status 1 (commands return 2 themselves where the request was refused)."""
    try:
        app()
    except MarathonError as exc:
        sys.exit(fail(str(exc)))
