"""Who a connecting node is: its own enrolled key, a join token being spent, or (legacy,
embedded mode and single-operator setups) the shared node secret.

A node id bound to a key can be taken only with that key; the shared secret cannot take it
either.  What is kept: a join token's hash, an enrolled node's public key.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated
from dataclasses import dataclass

import msgspec

from marathon.errors import AuthError, InvalidRequest
from marathon.protocol import messages as m
from marathon.protocol.auth import TOKEN_PREFIX, token_hash, verify_join_mac, verify_node_mac
from marathon.protocol.auth import verify_node_signature
from marathon.store import Store
from marathon.store.models import JoinToken, NodeCredential

MAX_TTL = 30 * 86400.0


class JoinTokenRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST /v1/nodes/join-tokens."""

    ttl: Annotated[float, msgspec.Meta(ge=1, le=MAX_TTL)] = 3600.0  # seconds the token can be used in
    # the enrolled node's cap (default: the orchestrator's node_max_slots)
    max_slots: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None


class JoinTokenCreated(msgspec.Struct):
    token: str  # shown once; the orchestrator keeps only its hash
    id: str
    expires_at: float
    max_slots: int


@dataclass(frozen=True)
class Admission:
    node_id: str
    mode: str  # secret | credential | join
    proof_key: str  # what the Welcome's mac is keyed with
    max_slots: int | None = None  # None: not capped (the shared secret is full trust)
    server_key: bytes = b""  # sent on enrolment


def capped(capacity: m.Capacity, max_slots: int | None) -> m.Capacity:
    """What the scheduler believes of a node's claim: never more slots (nor warm sandboxes)
    than it was enrolled with."""
    if max_slots is None:
        return capacity
    slots = max(0, min(capacity.slots, max_slots))
    warm = max(0, min(capacity.warm, slots))
    if slots == capacity.slots and warm == capacity.warm:
        return capacity
    return msgspec.structs.replace(capacity, slots=slots, warm=warm)


class NodeIdentities:
    def __init__(self, store: Store, secret: str, *, default_max_slots: int = 8):
        self.store, self.secret, self.default_max_slots = store, secret, default_max_slots

    async def create_join_token(
        self, *, ttl: float, max_slots: int | None, created_by: str, now: float | None = None
    ) -> tuple[str, JoinToken]:
        if not 1 <= ttl <= MAX_TTL:
            raise InvalidRequest(f"ttl must be between 1 second and {MAX_TTL / 86400:.0f} days")
        slots = self.default_max_slots if max_slots is None else max_slots
        if not 1 <= slots <= 1024:
            raise InvalidRequest("max_slots must be between 1 and 1024")
        now = time.time() if now is None else now
        tid = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{tid}.{secrets.token_urlsafe(32)}"
        rec = JoinToken(
            id=tid,
            token_hash=token_hash(token),
            created_at=now,
            expires_at=now + ttl,
            max_slots=slots,
            created_by=created_by,
        )
        await self.store.create_join_token(rec)
        return token, rec

    async def revoke(self, node_id: str) -> bool:
        return await self.store.revoke_node_credential(node_id, time.time())

    async def admit(self, auth: m.Authenticate, nonce: bytes) -> Admission:
        """Check a node's Authenticate against the nonce we sent; AuthError says why not."""
        nid = auth.node_id
        cred = await self.store.get_node_credential(nid)
        active = cred is not None and cred.revoked_at is None
        if auth.public_key:
            if not verify_node_signature(auth.public_key, nonce, nid, auth.signature):
                raise AuthError(f"node {nid}: bad signature")
            if cred is not None and active:
                if not secrets.compare_digest(cred.public_key, auth.public_key.hex()):
                    raise AuthError(f"node id {nid} is enrolled with another key: it cannot be taken")
                server_key = bytes.fromhex(cred.server_key) if auth.join_id else b""  # its Welcome was lost
                proof = cred.server_key
                if auth.join_id:
                    tok = await self.store.get_join_token(auth.join_id)
                    if tok is None or tok.used_by != nid:
                        raise AuthError(f"node id {nid} is enrolled already")
                    proof = tok.token_hash
                return Admission(nid, "credential", proof, cred.max_slots, server_key)
            if not auth.join_id:
                if cred is not None:
                    raise AuthError(f"node {nid} was revoked by an administrator")
                raise AuthError(f"node {nid} is not enrolled: start it with a join token (marathon nodes join-token)")
            return await self._enroll(auth, nonce)
        # the shared secret
        if cred is not None:
            raise AuthError(
                f"node {nid} was revoked by an administrator"
                if not active
                else f"node id {nid} is enrolled: only its own key can take it"
            )
        if not self.secret or not verify_node_mac(self.secret, nonce, nid, auth.mac):
            raise AuthError(f"node {auth.name!r} ({nid}) presented a wrong node secret")
        return Admission(nid, "secret", self.secret)

    async def _enroll(self, auth: m.Authenticate, nonce: bytes) -> Admission:
        nid, now = auth.node_id, time.time()
        tok = await self.store.get_join_token(auth.join_id)
        if tok is None or not verify_join_mac(tok.token_hash, nonce, nid, auth.public_key, auth.join_mac):
            raise AuthError("unknown join token")
        if tok.used_at is not None:
            raise AuthError(f"join token {tok.id} was used already (by node {tok.used_by})")
        if tok.expires_at <= now:
            raise AuthError(
                f"join token {tok.id} expired at {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(tok.expires_at))}"
            )
        if not await self.store.use_join_token(tok.id, nid, now):
            raise AuthError(f"join token {tok.id} was used already")
        server_key = secrets.token_bytes(32)
        cred = NodeCredential(
            node_id=nid,
            public_key=auth.public_key.hex(),
            server_key=server_key.hex(),
            max_slots=tok.max_slots,
            created_at=now,
        )
        if not await self.store.enroll_node(cred):
            raise AuthError(f"node id {nid} is enrolled with another key: it cannot be taken")
        return Admission(nid, "join", tok.token_hash, tok.max_slots, server_key)
