"""``marathon admin …``: run where the orchestrator's configuration is (its marathon.toml,
environment and data dir): these commands open the store directly, not through the API."""

from __future__ import annotations

import os
import sys

from cyclopts import App

from marathon.cli.app import app
from marathon.cli.app import fail as _fail

admin = App(
    name="admin",
    help="Administration with direct store access: run it where the orchestrator's configuration is.",
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
