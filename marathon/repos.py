"""What a ``--repo`` value is — one rule for the CLI, the orchestrator and the node.

- ``https://…``, ``http://…``, ``ssh://…``, ``git://…`` and scp-like ``user@host:path``: a remote URL;
- ``owner/name`` (one slash, no leading dot): always the repository on the GitHub host, even
  when a directory of that relative path happens to exist somewhere;
- an absolute path or ``file://`` URL: a repository on the node's disk (administrators only);
- anything else is a relative path: the CLI makes it absolute on the user's side
  (``--repo .``, ``--repo ./api``); the API refuses it.

And, for repositories a non-administrator names, which hosts may be reached: only hosts whose
every address is a public one (no loopback, link-local, private, shared or reserved ranges),
unless the operator allow-listed the host (``repo_hosts``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlparse

URL = re.compile(r"^(https?|ssh|git)://", re.I)
SCP = re.compile(r"^(?:[\w.-]+@)?([\w.-]+):(?!//)")
OWNER_NAME = re.compile(r"^([\w.-]+)/([\w.-]+?)(?:\.git)?$")


def classify(repo: str) -> str:
    """``url``, ``github``, ``local`` or ``relative``."""
    if repo.startswith("file://"):
        return "local"
    if URL.match(repo) or (SCP.match(repo) and not repo.startswith(("/", "."))):
        return "url"
    if OWNER_NAME.match(repo) and not repo.startswith("."):
        return "github"
    if os.path.isabs(repo):
        return "local"
    return "relative"


def is_local(repo: str) -> bool:
    return classify(repo) in ("local", "relative")


def local_path(repo: str) -> str:
    return repo[len("file://") :] if repo.startswith("file://") else repo


def url_host(url: str) -> tuple[str, int | None, str]:
    """(host, port, scheme) of a remote URL (scp-like ones are ssh)."""
    if URL.match(url):
        p = urlparse(url)
        return (p.hostname or "", p.port, p.scheme.lower())
    m = SCP.match(url)
    return (m.group(1) if m else "", None, "ssh")


def public_address(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_allowed(host: str, allow: list[str] | tuple[str, ...]) -> bool:
    """``allow`` entries are host names, or ``.domain`` for every host under that domain."""
    host = host.lower().rstrip(".")
    entries = [a.lower().rstrip(".") for a in allow]
    return any(host == a or (a.startswith(".") and host.endswith(a)) for a in entries)


class RemoteRefused(Exception):
    """A non-administrator's repository URL points at a host it may not reach."""


async def check_remote(url: str, allow: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The public addresses ``url``'s host resolves to; raises RemoteRefused when the host is
    not allowed (a loopback, link-local, private or reserved address, or it does not resolve)
    and is not in ``allow``.  Returns [] for an allow-listed host (it is not pinned)."""
    import trio

    host, port, scheme = url_host(url)
    if not host:
        raise RemoteRefused(f"no host in repository URL {url!r}")
    if host_allowed(host, allow):
        return []
    try:
        infos = await trio.socket.getaddrinfo(host, port or 443, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise RemoteRefused(f"cannot resolve {host}: {exc}") from None
    addrs = sorted({str(info[4][0]) for info in infos})
    bad = [a for a in addrs if not public_address(a)]
    if bad or not addrs:
        raise RemoteRefused(
            f"repository host {host} resolves to a non-public address ({', '.join(bad) or 'none'}); "
            "only administrators (or hosts in repo_hosts) may use such repositories"
        )
    return addrs


def needs_github_token(repo: str | None, pr: bool, github_url: str) -> bool:
    """Whether a task's assignment carries its owner's GitHub token: for a pull request
    (push and open it), or for a clone from the GitHub host (the repository may be private).
    Never for a task without a repository, on the node's disk, or on another host."""
    if not repo:
        return False
    if pr:
        return True
    kind = classify(repo)
    if kind == "github":
        return True
    if kind != "url":
        return False
    gh = (urlparse(github_url).hostname or "").lower()
    return bool(gh) and url_host(repo)[0].lower() == gh
