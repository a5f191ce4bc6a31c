"""Users, passwords (argon2id), API keys and login tokens, and who a request is.

Passwords are the one place an unauthenticated caller makes the orchestrator spend memory:
argon2id holds ``memory_cost`` (64 MiB with the library's defaults) for each hash.  Hashing
runs in its own ``trio.CapacityLimiter`` of :data:`HASH_CONCURRENCY` (4): at most 4 x 64 MiB =
256 MiB in hashes at any moment, however many sign-ins arrive; at most :data:`HASH_QUEUE` more
wait for a turn, and beyond that a sign-in is answered 429 at once (it costs nothing).

Failed sign-ins are throttled per account and per client address (``LoginThrottle``: in-process,
or Redis shared by replicas), registration attempts per client address; a blocked key answers
429 with ``Retry-After`` before any hash is computed, and the same for an account that does not
exist as for one that does.  An unknown account and a wrong password get the same answer after
the same work: one verification against a hash with the same parameters (a dummy one).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass

import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from marathon.bus.throttle import LoginThrottle, MemoryThrottle
from marathon.errors import AuthError, Conflict, Forbidden, InvalidRequest, NotFound, RateLimited
from marathon.store.models import ApiKey, Session, User

log = logging.getLogger("marathon.auth")
_hasher = PasswordHasher()  # argon2id with the library's current defaults (64 MiB, 3 passes, 4 lanes)
_DUMMY_HASH = _hasher.hash("not-a-password")  # same parameters as every new hash: same work to verify
BAD_LOGIN = "invalid email or password"
HASH_CONCURRENCY = 4  # argon2id hashes at once: with 64 MiB each, at most 256 MiB in hashing
HASH_QUEUE = 64  # sign-ins waiting for a hash slot; beyond that, 429 at once
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


@dataclass(frozen=True)
class LoginLimits:
    account_failures: int = 5  # failed sign-ins per account in a window, then 429 until it ends
    client_failures: int = 20  # failed sign-ins per client address in a window
    window: float = 900.0  # seconds (a fixed window from the first failure: bus/throttle.py)
    registrations: int = 10  # registration attempts per client address per registration_window
    registration_window: float = 3600.0

    @classmethod
    def from_config(cls, config) -> LoginLimits:
        return cls(
            account_failures=config.login_account_failures,
            client_failures=config.login_client_failures,
            window=config.login_window,
            registrations=config.register_attempts,
            registration_window=config.register_window,
        )


def _account_key(email: str) -> str:
    return "login:account:" + email


def _client_key(client: str) -> str:
    return "login:client:" + client


def _register_key(client: str) -> str:
    return "register:client:" + client


class Accounts:
    def __init__(
        self,
        store,
        *,
        session_ttl: float,
        allow_registration: bool = True,
        throttle: LoginThrottle | None = None,
        limits: LoginLimits = LoginLimits(),
        hash_concurrency: int = HASH_CONCURRENCY,
    ):
        self.store = store
        self.session_ttl = session_ttl
        self.allow_registration = allow_registration
        self.throttle: LoginThrottle = throttle or MemoryThrottle()
        self.limits = limits
        self.hashing = trio.CapacityLimiter(hash_concurrency)  # our own: trio's shared one allows 40

    async def _hash_call(self, fn, *args):
        """Run an argon2 call in the bounded limiter; 429 at once when too many are waiting."""
        if self.hashing.statistics().tasks_waiting >= HASH_QUEUE:
            raise RateLimited("too many sign-ins at once; try again in a moment", 1.0)
        return await trio.to_thread.run_sync(fn, *args, limiter=self.hashing)

    async def _refuse_if_blocked(self, keys: list[tuple[str, int]], what: str) -> None:
        for key, limit in keys:
            wait = await self.throttle.check(key, limit=limit)
            if wait > 0:
                raise RateLimited(f"too many {what}; try again in {math.ceil(wait)}s", wait)

    async def lift_lockout(self, *, email: str | None = None, client: str | None = None) -> None:
        """An administrator lifts a lockout: an account's failed sign-ins, or a client address's
        failed sign-ins and registration attempts, are forgotten."""
        if email:
            await self.throttle.reset(_account_key(email.strip().lower()))
        if client:
            await self.throttle.reset(_client_key(client))
            await self.throttle.reset(_register_key(client))

    async def register(
        self, email: str, password: str, *, by_admin: bool = False, admin: bool = False, client: str | None = None
    ) -> User:
        """Open registration, or (when closed) by an administrator.  The first account on an
        orchestrator administers it — decided inside the store's transaction, so two
        simultaneous first registrations cannot both become administrators.  Attempts that are
        not an administrator's count against the client address (``client``), whatever they end in."""
        if client and not (by_admin or admin):
            key = _register_key(client)
            await self._refuse_if_blocked([(key, self.limits.registrations)], "registration attempts")
            await self.throttle.hit(key, limit=self.limits.registrations, window=self.limits.registration_window)
        email = _check_email(email)
        if len(password) < 8:
            raise InvalidRequest("the password must be at least 8 characters")
        if not (self.allow_registration or by_admin or admin) and await self.store.count_users() > 0:
            raise Forbidden("registration is closed on this orchestrator: an administrator registers users")
        pw_hash = await self._hash_call(_hasher.hash, password)
        user = User(id="u_" + uuid.uuid4().hex[:12], email=email, password_hash=pw_hash, admin=admin)
        return await self.store.create_user(user, admin_if_first=True)

    async def login(self, email: str, password: str, *, client: str | None = None) -> tuple[str, Session, User]:
        """A session for a correct password.  Throttled per account and per ``client`` address
        (429 before any hashing while blocked); a failure counts against both."""
        email = email.strip().lower()
        keys = [(_account_key(email), self.limits.account_failures)]
        if client:
            keys.append((_client_key(client), self.limits.client_failures))
        await self._refuse_if_blocked(keys, "failed sign-ins")
        user = await self.store.get_user_by_email(email)
        # same work, same answer, whether or not the email exists
        stored = user.password_hash if user else _DUMMY_HASH

        def verify() -> bool:
            try:
                return _hasher.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return False

        if not await self._hash_call(verify) or user is None:
            for key, limit in keys:
                await self.throttle.hit(key, limit=limit, window=self.limits.window)
            raise AuthError(BAD_LOGIN)
        await self.throttle.reset(_account_key(email))
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
