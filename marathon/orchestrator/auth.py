"""Users, passwords (argon2id), API keys and login tokens, and who a request is."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
import uuid
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from marathon.errors import AuthError, Conflict, Forbidden, InvalidRequest, NotFound
from marathon.store.models import ApiKey, Session, User

log = logging.getLogger("marathon.auth")
_hasher = PasswordHasher()  # argon2id with the library's current defaults
_DUMMY_HASH = _hasher.hash("not-a-password")
BAD_LOGIN = "invalid email or password"
KEY_PREFIX, SESSION_PREFIX = "mk_", "ms_"


@dataclass(frozen=True)
class Principal:
    user: str  # user id
    email: str = ""
    admin: bool = False


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_email(email: str) -> str:
    email = email.strip().lower()
    if "@" not in email or len(email) > 254 or email.startswith("@") or email.endswith("@"):
        raise InvalidRequest("a valid email address is required")
    return email


class Accounts:
    def __init__(self, store, *, session_ttl: float, allow_registration: bool = True):
        self.store = store
        self.session_ttl = session_ttl
        self.allow_registration = allow_registration

    async def register(self, email: str, password: str, *, by_admin: bool = False, admin: bool = False) -> User:
        """Open registration, or (when closed) by an administrator.  The first account on an
        orchestrator administers it — decided inside the store's transaction, so two
        simultaneous first registrations cannot both become administrators."""
        email = _check_email(email)
        if len(password) < 8:
            raise InvalidRequest("the password must be at least 8 characters")
        if not (self.allow_registration or by_admin or admin) and await self.store.count_users() > 0:
            raise Forbidden("registration is closed on this orchestrator: an administrator registers users")
        import trio

        pw_hash = await trio.to_thread.run_sync(_hasher.hash, password)
        user = User(id="u_" + uuid.uuid4().hex[:12], email=email, password_hash=pw_hash, admin=admin)
        return await self.store.create_user(user, admin_if_first=True)

    async def login(self, email: str, password: str) -> tuple[str, Session, User]:
        import trio

        user = await self.store.get_user_by_email(email.strip().lower())
        # same work, same answer, whether or not the email exists
        stored = user.password_hash if user else _DUMMY_HASH

        def verify() -> bool:
            try:
                return _hasher.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return False

        if not await trio.to_thread.run_sync(verify) or user is None:
            raise AuthError(BAD_LOGIN)
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        session = Session(
            token_hash=token_hash(token), user_id=user.id, created_at=now, expires_at=now + self.session_ttl
        )
        await self.store.create_session(session)
        return token, session, user

    async def logout(self, token: str) -> None:
        await self.store.revoke_session(token_hash(token))

    async def create_key(self, user: Principal, name: str) -> tuple[str, ApiKey]:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        rec = ApiKey(
            id="k_" + uuid.uuid4().hex[:12],
            user_id=user.user,
            name=name[:100] or "key",
            prefix=key[:10],
            key_hash=token_hash(key),
        )
        await self.store.create_api_key(rec)
        return key, rec

    async def revoke_key(self, user: Principal, key_id: str) -> None:
        if not await self.store.revoke_api_key(user.user, key_id):
            raise NotFound(f"no active key {key_id!r}")

    async def authenticate(self, authorization: str | None, x_api_key: str | None = None) -> Principal:
        token = ""
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        elif x_api_key:
            token = x_api_key.strip()
        if not token:
            raise AuthError("authentication required: send 'Authorization: Bearer <API key or login token>'")
        h = token_hash(token)
        if token.startswith(SESSION_PREFIX):
            found = await self.store.find_session(h)
            if found:
                return Principal(found[1].id, found[1].email, found[1].admin)
        elif token.startswith(KEY_PREFIX):
            found = await self.store.find_api_key(h)
            if found:
                return Principal(found[1].id, found[1].email, found[1].admin)
        raise AuthError("invalid, expired or revoked credentials")

    async def ensure_local_admin(self, email: str = "admin@localhost") -> User:
        """Embedded mode: the first start creates a local administrator (no password login)."""
        user = await self.store.get_user_by_email(email)
        if user is not None:
            return user
        try:
            return await self.register(email, secrets.token_urlsafe(24), admin=True)
        except Conflict:
            return await self.store.get_user_by_email(email)
