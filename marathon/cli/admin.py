"""``marathon admin …``.  ``create-user``, ``rotate-secrets`` and ``new-secrets-key`` run where
the orchestrator's configuration is (its marathon.toml, environment and data dir) and open the
store directly, not through the API, like Django's ``createsuperuser``: that is how the first
administrator is made.  ``users``, ``disable``, ``enable``, ``revoke-key`` and ``unlock`` are API
clients for a signed-in administrator (``--url``/MARATHON_URL, the saved login or MARATHON_TOKEN)."""

from __future__ import annotations

import os
import sys

from typing import Annotated

from cyclopts import App, Parameter

from marathon.cli import render
from marathon.cli.app import Url, api_client, app
from marathon.cli.app import fail as _fail

admin = App(
    name="admin",
    help="Administration: create-user and the secrets commands open the store directly (run them where the "
    "orchestrator's configuration is); the others call the API as an administrator.",
)
app.command(admin)


def _config(data_dir: str | None):
    from marathon.config import load_config

    return load_config({"data_dir": data_dir})


@admin.command(name="new-secrets-key")
def new_secrets_key() -> int:
    """Print a new random key for ``secrets_key`` (32 bytes, base64url)."""
    from marathon.secretbox import new_key

    print(new_key())
    return 0


@admin.command(name="rotate-secrets")
def rotate_secrets(*, data_dir: str | None = None) -> int:
    """Re-encrypt every stored GitHub token with the current ``secrets_key``.

    The keys come from the orchestrator's configuration: ``secrets_key`` (the new one) and
    ``secrets_old_keys`` (the ones the tokens may still be encrypted with).  Afterwards the
    old keys can be removed from ``secrets_old_keys``.

    Parameters
    ----------
    data_dir
        The orchestrator's data dir (default: as configured).
    """
    import trio

    from marathon.errors import ConfigError, StoreError
    from marathon.secretbox import load_secret_box
    from marathon.store import open_store

    os.umask(0o077)  # whatever it creates (a key file, a database) is the orchestrator's alone
    try:
        config = _config(data_dir)
        key_id = load_secret_box(config, config.data_dir).key_id

        async def run() -> tuple[int, int]:
            store = await open_store(config.store, config.data_dir, config=config)
            try:
                return await store.reseal_secrets()
            finally:
                await store.close()

        changed, total = trio.run(run)
    except (ConfigError, StoreError) as exc:
        return _fail(str(exc), 2)
    print(f"{changed} of {total} GitHub tokens re-encrypted; all are now encrypted with key {key_id}", file=sys.stdout)
    return 0


@admin.command(name="create-user")
def create_user(
    email: str,
    *,
    admin_: Annotated[bool, Parameter(name="--admin")] = False,
    password_stdin: bool = False,
    data_dir: str | None = None,
) -> int:
    """Create an account directly in the orchestrator's store (the first administrator is made so).

    Parameters
    ----------
    email
        The account's email address.
    admin_
        Make it an administrator.
    password_stdin
        Read the password from standard input (one line) instead of prompting.
    data_dir
        The orchestrator's data dir (default: as configured).
    """
    import trio

    from marathon.cli.accounts import _password
    from marathon.errors import Conflict, ConfigError, InvalidRequest, StoreError
    from marathon.orchestrator.auth import Accounts
    from marathon.store import open_store

    os.umask(0o077)  # a database or key file it creates is the orchestrator's alone
    password = _password(password_stdin, confirm=True)
    try:
        config = _config(data_dir)

        async def run():
            store = await open_store(config.store, config.data_dir, config=config)
            try:
                return await Accounts(store, session_ttl=config.session_ttl).create_user(email, password, admin=admin_)
            finally:
                await store.close()

        user = trio.run(run)
    except (InvalidRequest, Conflict) as exc:
        return _fail(str(exc), 2)
    except (ConfigError, StoreError) as exc:
        return _fail(str(exc), 1)
    print(f"created {user.email} ({user.id}){' administrator' if user.admin else ''}")
    return 0


@admin.command(name="users")
def users(*, url: Url = None) -> int:
    """List every account (administrators)."""
    data = api_client(url).get("/v1/admin/users")
    for u in data["users"]:
        role = "admin" if u["admin"] else "user"
        state = "disabled" if u["disabled"] else "active"
        print(f"{u['id']:<16} {role:<5} {state:<8} {render.age(u['created_at']):>4}  {u['email']}")
    if not data["users"]:
        print("no users")
    return 0


def _set_disabled(user: str, disabled: bool, url: str | None) -> int:
    from urllib.parse import quote

    from marathon.cli.client import ApiError

    try:
        u = api_client(url).post(f"/v1/admin/users/{quote(user, safe='')}/{'disable' if disabled else 'enable'}")
    except ApiError as exc:
        return _fail(exc.message, 2 if exc.status in (400, 404, 409) else 1)
    print(f"{u['email']} {'disabled: its keys and sessions no longer work' if disabled else 'enabled'}")
    return 0


@admin.command(name="disable")
def disable(user: str, *, url: Url = None) -> int:
    """Disable an account (email or id): its keys and sessions stop working at once."""
    return _set_disabled(user, True, url)


@admin.command(name="enable")
def enable(user: str, *, url: Url = None) -> int:
    """Enable a disabled account again (its API keys work again; it signs in anew)."""
    return _set_disabled(user, False, url)


@admin.command(name="revoke-key")
def revoke_key(key_id: str, *, url: Url = None) -> int:
    """Revoke any user's API key by its id."""
    from urllib.parse import quote

    from marathon.cli.client import ApiError

    try:
        api_client(url).request("DELETE", f"/v1/admin/keys/{quote(key_id, safe='')}")
    except ApiError as exc:
        return _fail(exc.message, 2 if exc.status == 404 else 1)
    print(f"revoked {key_id}")
    return 0


@admin.command(name="unlock")
def unlock(*, email: str | None = None, client: str | None = None, url: Url = None) -> int:
    """Lift a sign-in lockout: an account's (--email) or a client address's (--client)."""
    if not (email or client):
        return _fail("give --email, --client or both", 2)
    body = {k: v for k, v in (("email", email), ("client", client)) if v}
    api_client(url).post("/v1/admin/unlock", body)
    print("lockout lifted")
    return 0
