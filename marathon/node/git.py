"""Preparing the task's repository on the node (the sandbox never sees credentials)."""

from __future__ import annotations

import os
import re

import trio

from marathon.errors import RepoError

GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "Marathon", "GIT_AUTHOR_EMAIL": "marathon@localhost",
    "GIT_COMMITTER_NAME": "Marathon", "GIT_COMMITTER_EMAIL": "marathon@localhost",
    "LANG": "C.UTF-8",
}
_URLISH = re.compile(r"^(https?|ssh|git|file)://|^[\w.-]+@[\w.-]+:")


def classify_repo(repo: str) -> str:
    """'url' or 'path'.  (owner/name GitHub shorthand comes with the git issue.)"""
    return "url" if _URLISH.match(repo) else "path"


async def git(*args: str, cwd: str | None = None, timeout: float = 600) -> str:
    env = {**os.environ, **GIT_ENV}
    with trio.move_on_after(timeout) as scope:
        res = await trio.run_process(["git", *args], cwd=cwd, capture_stdout=True, capture_stderr=True, check=False, env=env)
    if scope.cancelled_caught:
        raise RepoError(f"git {args[0]} timed out after {timeout:.0f}s")
    if res.returncode != 0:
        raise RepoError(f"git {args[0]} failed: {res.stderr.decode(errors='replace').strip()[-500:]}")
    return res.stdout.decode(errors="replace")


async def prepare_workspace(repo: str | None, branch: str | None, dest: str, *, owner_uid: int | None) -> str:
    """Clone ``repo`` (or start an empty repository) into ``dest``; returns the base commit."""
    if repo:
        src = repo
        if classify_repo(repo) == "path":
            src = os.path.abspath(os.path.expanduser(repo))
            if not os.path.isdir(src):
                raise RepoError(f"repository {repo!r} does not exist on this node")
        args = ["clone", "--quiet", "--no-hardlinks"]
        if branch:
            args += ["--branch", branch]
        await git(*args, "--", src, dest)
    else:
        os.makedirs(dest, exist_ok=True)
        await git("init", "--quiet", dest)
        await git("commit", "--quiet", "--allow-empty", "-m", "empty workspace", cwd=dest)
    try:
        base = (await git("rev-parse", "HEAD", cwd=dest)).strip()
    except RepoError:
        await git("commit", "--quiet", "--allow-empty", "-m", "empty workspace", cwd=dest)
        base = (await git("rev-parse", "HEAD", cwd=dest)).strip()
    if owner_uid is not None:
        await trio.to_thread.run_sync(_chown_tree, dest, owner_uid)
    return base


def _chown_tree(root: str, uid: int) -> None:
    os.chown(root, uid, uid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)
