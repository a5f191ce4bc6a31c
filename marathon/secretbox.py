"""Secrets at rest (users' GitHub tokens): AEAD with a key ring.  Pure apart from making a key.

A sealed value is text, ``mse1:<key id>:<base64url(nonce | ciphertext | tag)>``, AES-256-GCM
with a random 96-bit nonce per value.  The associated data binds a value to what it is and
whose it is (``github_token`` of user ``u_…``): a sealed token copied onto another user's row
does not open.  The key id (8 hex digits of a hash of the key) names the key that sealed a
value, so a missing or wrong key is reported by name, never guessed at.

Keys are 32 random bytes, written as unpadded base64url (``marathon admin new-secrets-key``
prints one).  The *current* key seals; the current and every *old* key open -- that is how a
rotation runs without downtime (README: "Rotating the secrets key").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from marathon.errors import ConfigError, SecretsError

if TYPE_CHECKING:
    from marathon.config import Config

PREFIX = "mse1:"
KEY_BYTES = 32
NONCE_BYTES = 12


def new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).rstrip(b"=").decode()


def parse_key(text: str, what: str = "secrets_key") -> bytes:
    raw = text.strip()
    try:
        key = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"{what} must be {KEY_BYTES} random bytes in base64url (43 characters); "
            "make one with `marathon admin new-secrets-key`"
        )
    return key


KEY_FILE = "secrets_key"  # in the data dir, 0600, when no secrets_key is configured


def load_secret_box(config: Config | None, data_dir: str) -> SecretBox:
    """The configured ``secrets_key`` (and ``secrets_old_keys``), or a key generated once into
    ``<data_dir>/secrets_key`` (0600).  With a configured key, a key file left in the data dir
    still opens what it sealed (it counts as an old key), so moving from the generated key to
    a configured one is: configure it, run ``marathon admin rotate-secrets``."""
    from marathon.config import state_value

    old = list(config.secrets_old_key_list()) if config is not None else []
    if config is not None and config.secrets_key:
        current = config.secrets_key
        path = os.path.join(data_dir, KEY_FILE)
        if os.path.exists(path):
            with open(path) as f:
                old.append(f.read().strip())
    else:
        current = state_value(data_dir, KEY_FILE, new_key)
    return SecretBox.from_text(current, old)


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"marathon secrets key id\0" + key).hexdigest()[:8]


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


def sealed_key_id(value: str) -> str | None:
    if not is_sealed(value):
        return None
    kid, sep, _ = value[len(PREFIX) :].partition(":")
    return kid if sep else None


def token_aad(user_id: str) -> bytes:
    return b"marathon:github_token:" + user_id.encode()


class SecretBox:
    def __init__(self, current: bytes, old: Sequence[bytes] = ()):
        self._current = AESGCM(current)
        self.key_id = key_id(current)
        self._keys = {self.key_id: self._current}
        for k in old:
            self._keys.setdefault(key_id(k), AESGCM(k))

    @classmethod
    def from_text(cls, current: str, old: Iterable[str] = ()) -> SecretBox:
        return cls(parse_key(current), [parse_key(k, "secrets_old_keys") for k in old])

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def seal(self, plaintext: str, *, aad: bytes) -> str:
        nonce = os.urandom(NONCE_BYTES)
        blob = nonce + self._current.encrypt(nonce, plaintext.encode(), aad)
        return f"{PREFIX}{self.key_id}:{base64.urlsafe_b64encode(blob).rstrip(b'=').decode()}"

    def open(self, sealed: str, *, aad: bytes, what: str = "a secret") -> str:
        kid = sealed_key_id(sealed)
        if kid is None:
            raise SecretsError(f"{what} is not sealed (no {PREFIX} prefix)")
        box = self._keys.get(kid)
        if box is None:
            raise SecretsError(unknown_keys_message({kid: 1}, self.key_ids, what=what))
        body = sealed[len(PREFIX) + len(kid) + 1 :]
        try:
            blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return box.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad).decode()
        except (InvalidTag, binascii.Error, ValueError) as exc:
            raise SecretsError(
                f"{what} does not decrypt with key {kid}: the stored value was altered or belongs to another record"
            ) from exc

    def knows(self, kid: str | None) -> bool:
        return kid in self._keys


CHECK_NAME = "secrets_check"  # a value sealed with the store's key, kept in its meta table
_CHECK_AAD = b"marathon:secrets_check"
_CHECK_TEXT = "marathon secrets check"


def check_value(existing: str | None, box: SecretBox, *, rotate: bool) -> str | None:
    """The store's key check: every process that opens a store must hold the key its secrets are
    sealed with, even before any secret exists (two replicas that each generated a key would
    otherwise seal tokens the other cannot open).  Returns the value to write (first open, or a
    rotation), None to keep it; SecretsError when this box cannot open it."""
    if existing is None:
        return box.seal(_CHECK_TEXT, aad=_CHECK_AAD)
    kid = sealed_key_id(existing)
    if not box.knows(kid):
        raise SecretsError(
            f"this store's secrets are encrypted with key id {kid}, which this process does not have "
            f"(it has {', '.join(box.key_ids)}).  Set secrets_key (MARATHON_SECRETS_KEY) to that key, or list "
            "it in secrets_old_keys (MARATHON_SECRETS_OLD_KEYS) -- every orchestrator replica needs the same keys"
        )
    if box.open(existing, aad=_CHECK_AAD, what="the store's key check") != _CHECK_TEXT:
        raise SecretsError("the store's key check does not match")
    return box.seal(_CHECK_TEXT, aad=_CHECK_AAD) if rotate and kid != box.key_id else None


def unknown_keys_message(counts: dict[str, int], have: list[str], *, what: str = "GitHub tokens") -> str:
    ids = ", ".join(f"{k} ({n})" for k, n in sorted(counts.items()))
    return (
        f"{what} in the store were encrypted with a key this process does not have: key id {ids}; "
        f"it has {', '.join(have)}.  Set secrets_key (MARATHON_SECRETS_KEY) to the key they were "
        "encrypted with, or list that key in secrets_old_keys (MARATHON_SECRETS_OLD_KEYS) -- every "
        "orchestrator replica needs the same keys"
    )


def plan_reseal(
    rows: Iterable[tuple[str, str]], box: SecretBox, *, rotate: bool
) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """For (user id, stored value) rows: the updates to make ``(user id, old, new)`` and the
    counts of values sealed with keys the box does not have.  Plaintext (written before
    encryption at rest) is always sealed; with ``rotate``, values sealed with an old key are
    sealed again with the current one."""
    updates: list[tuple[str, str, str]] = []
    unknown: dict[str, int] = {}
    for user_id, value in rows:
        kid = sealed_key_id(value)
        aad = token_aad(user_id)
        if kid is None:
            updates.append((user_id, value, box.seal(value, aad=aad)))
        elif not box.knows(kid):
            unknown[kid] = unknown.get(kid, 0) + 1
        elif rotate and kid != box.key_id:
            plain = box.open(value, aad=aad, what=f"the GitHub token of user {user_id}")
            updates.append((user_id, value, box.seal(plain, aad=aad)))
    return updates, unknown
