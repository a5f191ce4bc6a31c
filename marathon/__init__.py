"""Marathon: run Claude Code tasks in isolated sandboxes across a fleet."""

__version__ = "0.1.0"
