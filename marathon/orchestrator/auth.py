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

Account lifecycle: accounts are created by an administrator (``marathon admin create-user`` with
direct store access, or the API as an administrator), or by open registration only when
``allow_registration`` is set; nobody becomes administrator by registering first.  Sessions
expire (``session_ttl``) and expired ones are purged in bounded batches.  API keys may expire;
a key's ``last_used_at`` is written at most once per :data:`LAST_USED_INTERVAL`.  A disabled
user's keys and sessions are refused on every authentication (the user row is read with them).
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
from marathon.errors import AuthError, Conflict, Forbidden, InvalidRequest, MarathonError, NotFound, RateLimited
from marathon.store.models import ApiKey, Session, User

log = logging.getLogger("marathon.auth")
_hasher = PasswordHasher()  # argon2id with the library's current defaults (64 MiB, 3 passes, 4 lanes)
_DUMMY_HASH = _hasher.hash("not-a-password")  # same parameters as every new hash: same work to verify
BAD_LOGIN = "invalid email or password"
HASH_CONCURRENCY = 4  # argon2id hashes at once: with 64 MiB each, at most 256 MiB in hashing
HASH_QUEUE = 64  # sign-ins waiting for a hash slot; beyond that, 429 at once
KEY_PREFIX, SESSION_PREFIX = "mk_", "ms_"
LAST_USED_INTERVAL = 60.0  # seconds: a key's last_used_at is written at most this often
PURGE_BATCH = 500  # expired sessions deleted per statement
PURGE_MAX_BATCHES = 20  # per purge pass: bounded work, the rest waits for the next pass
DISABLED = "this account is disabled: an administrator can enable it"


@dataclass(frozen=True)
class Principal:
    user: str  # user id
    email: str = ""
    admin: bool = False
    key_id: str | None = None  # the API key it authenticated with (None: a login session)


def needs_touch(recorded: float | None, now: float, interval: float = LAST_USED_INTERVAL) -> bool:
    """Whether a key's use at ``now`` is worth a write, given the last one recorded."""
    return recorded is None or now - recorded >= interval


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_email(email: str) -> str:
    if "\n" in email:
        raise InvalidRequest("a valid email address is required")
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
        self._touched: dict[str, float] = {}  # key id -> when this replica last wrote its last_used_at

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

    async def create_user(self, email: str, password: str, *, admin: bool = False) -> User:
        """A new account, for a trusted caller (an administrator, ``marathon admin create-user``,
        the embedded mode's local administrator): no registration check, no throttle."""
        email = _check_email(email)
        if len(password) < 8:
            raise InvalidRequest("the password must be at least 8 characters")
        pw_hash = await self._hash_call(_hasher.hash, password)
        user = User(id="u_" + uuid.uuid4().hex[:12], email=email, password_hash=pw_hash, admin=admin)
        return await self.store.create_user(user)

    async def register(
        self, email: str, password: str, *, by_admin: bool = False, admin: bool = False, client: str | None = None
    ) -> User:
        """POST /v1/auth/register: open registration when ``allow_registration``; otherwise only
        an administrator (``by_admin``) adds users, and only an administrator makes one an
        administrator.  Attempts that are not an administrator's count against the client
        address (``client``), whatever they end in."""
        if admin and not by_admin:
            raise Forbidden("only an administrator can create an administrator")
        if not by_admin:
            if client:
                await self.registration_attempt(client)
            if not self.allow_registration:
                raise Forbidden(
                    "registration is closed on this orchestrator: an administrator creates accounts "
                    "(marathon admin create-user EMAIL)"
                )
        return await self.create_user(email, password, admin=admin)

    async def registration_attempt(self, client: str) -> None:
        """Count a registration attempt from ``client`` (429 while it is blocked): called before
        the request is even decoded, so malformed attempts count too."""
        key = _register_key(client)
        await self._refuse_if_blocked([(key, self.limits.registrations)], "registration attempts")
        await self.throttle.hit(key, limit=self.limits.registrations, window=self.limits.registration_window)

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
        if user.disabled:
            raise Forbidden(DISABLED)
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        session = Session(
            token_hash=token_hash(token), user_id=user.id, created_at=now, expires_at=now + self.session_ttl
        )
        await self.store.create_session(session)
        return token, session, user

    async def logout(self, token: str) -> None:
        await self.store.revoke_session(token_hash(token))

    async def purge_sessions(self, now: float | None = None) -> int:
        """Delete expired sessions, at most PURGE_BATCH x PURGE_MAX_BATCHES per call."""
        now = time.time() if now is None else now
        total = 0
        for _ in range(PURGE_MAX_BATCHES):
            n = await self.store.purge_sessions(now, PURGE_BATCH)
            total += n
            if n < PURGE_BATCH:
                break
        return total

    async def serve_session_purge(self, interval: float, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Purge expired sessions every ``interval`` seconds (a failure is logged, not fatal)."""
        task_status.started()
        while True:
            try:
                n = await self.purge_sessions()
                if n:
                    log.info("purged %d expired login sessions", n)
            except MarathonError as exc:
                log.warning("purging expired sessions failed: %s", exc)
            await trio.sleep(interval)

    async def create_key(self, user: Principal, name: str, expires_at: float | None = None) -> tuple[str, ApiKey]:
        if expires_at is not None and not (math.isfinite(expires_at) and expires_at > time.time()):
            raise InvalidRequest("expires_at must be a time in the future (seconds since the epoch)")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        rec = ApiKey(
            id="k_" + uuid.uuid4().hex[:12],
            user_id=user.user,
            name=name[:100] or "key",
            prefix=key[:10],
            key_hash=token_hash(key),
            expires_at=expires_at,
        )
        await self.store.create_api_key(rec)
        return key, rec

    async def revoke_key(self, user: Principal, key_id: str) -> None:
        if not await self.store.revoke_api_key(user.user, key_id):
            raise NotFound(f"no active key {key_id!r}")

    async def authenticate(self, authorization: str | None, x_api_key: str | None = None) -> Principal:
        """Who a request is.  Every call reads the user with the credential: a disabled user's
        keys and sessions stop working at once (403), an expired or revoked one is 401."""
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
                if found[1].disabled:
                    raise Forbidden(DISABLED)
                return Principal(found[1].id, found[1].email, found[1].admin)
        elif token.startswith(KEY_PREFIX):
            got = await self.store.find_api_key(h)
            if got:
                key, user = got
                if user.disabled:
                    raise Forbidden(DISABLED)
                await self._touch(key)
                return Principal(user.id, user.email, user.admin, key.id)
        raise AuthError("invalid, expired or revoked credentials")

    async def _touch(self, key: ApiKey) -> None:
        """Record the key's use, throttled: the recorded time (this replica's memory of its own
        writes, or the store's) must be LAST_USED_INTERVAL old before another write."""
        now = time.time()
        recorded = max(key.last_used_at or 0.0, self._touched.get(key.id, 0.0)) or None
        if not needs_touch(recorded, now):
            return
        if len(self._touched) >= 10_000:  # bounded: forgetting only costs a conditional write
            self._touched.clear()
        self._touched[key.id] = now
        await self.store.touch_api_key(key.id, now, LAST_USED_INTERVAL)

    # ------------------------------------------------------------------ administrators

    async def find_user(self, ref: str) -> User:
        """A user by id or email (404 when neither)."""
        user = await self.store.get_user(ref) or await self.store.get_user_by_email(ref.strip().lower())
        if user is None:
            raise NotFound(f"no user {ref!r}")
        return user

    async def set_disabled(self, actor: Principal, ref: str, disabled: bool) -> User:
        user = await self.find_user(ref)
        if disabled and user.id == actor.user:
            raise Conflict("you cannot disable your own account")
        updated = await self.store.set_user_disabled(user.id, disabled)
        if updated is None:
            raise NotFound(f"no user {ref!r}")
        log.info("user %s %s by %s", updated.email, "disabled" if disabled else "enabled", actor.email or actor.user)
        return updated

    async def admin_revoke_key(self, actor: Principal, key_id: str) -> None:
        if not await self.store.revoke_api_key(None, key_id):
            raise NotFound(f"no active key {key_id!r}")
        log.info("API key %s revoked by administrator %s", key_id, actor.email or actor.user)

    async def ensure_local_admin(self, email: str = "admin@localhost") -> User:
        """Embedded mode: the first start creates a local administrator (no password login)."""
        user = await self.store.get_user_by_email(email)
        if user is not None:
            return user
        try:
            return await self.create_user(email, secrets.token_urlsafe(24), admin=True)
        except Conflict:
            return await self.store.get_user_by_email(email)
