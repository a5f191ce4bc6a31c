"""Node authentication: proofs over the orchestrator's fresh nonce, never a replayable token.

Two ways for a node to prove itself:
- the shared node secret (embedded mode, single-operator setups): an HMAC;
- its own key (enrolled with a join token): an Ed25519 signature; the orchestrator keeps
  only the public half.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def node_mac(secret: str, nonce: bytes, node_id: str) -> bytes:
    return hmac.new(secret.encode(), nonce + b"\0" + node_id.encode(), hashlib.sha256).digest()


def verify_node_mac(secret: str, nonce: bytes, node_id: str, mac: bytes) -> bool:
    return hmac.compare_digest(mac, node_mac(secret, nonce, node_id))


def orchestrator_mac(secret: str, nonce: bytes, node_id: str) -> bytes:
    """The orchestrator's proof to a node (a different message, so one side's answer can
    never be replayed as the other's)."""
    return hmac.new(secret.encode(), b"orchestrator\0" + nonce + b"\0" + node_id.encode(), hashlib.sha256).digest()


TOKEN_PREFIX = "mjt_"  # join tokens: mjt_<id>.<secret>


def split_token(token: str) -> tuple[str, str] | None:
    """``mjt_<id>.<secret>`` -> (id, secret); None for anything else."""
    if not token.startswith(TOKEN_PREFIX) or "." not in token:
        return None
    tid, _, rest = token[len(TOKEN_PREFIX) :].partition(".")
    return (tid, rest) if tid and rest else None


def token_hash(token: str) -> str:
    """What the orchestrator keeps of a join token (and proves itself with while enrolling)."""
    return hashlib.sha256(token.encode()).hexdigest()


def join_mac(token: str, nonce: bytes, node_id: str, public: bytes) -> bytes:
    """Proof of a join token without sending it: keyed with its hash, bound to the key enrolled."""
    return hmac.new(token_hash(token).encode(), b"join\0" + nonce + b"\0" + node_id.encode() + b"\0" + public,
                    hashlib.sha256).digest()  # fmt: skip


def verify_join_mac(stored_hash: str, nonce: bytes, node_id: str, public: bytes, mac: bytes) -> bool:
    want = hmac.new(stored_hash.encode(), b"join\0" + nonce + b"\0" + node_id.encode() + b"\0" + public,
                    hashlib.sha256).digest()  # fmt: skip
    return hmac.compare_digest(want, mac)


def _signed(nonce: bytes, node_id: str) -> bytes:
    return b"marathon-node\0" + nonce + b"\0" + node_id.encode()


def node_signature(private_key: bytes, nonce: bytes, node_id: str) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private_key).sign(_signed(nonce, node_id))


def public_key(private_key: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return Ed25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def new_private_key() -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    return Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def verify_node_signature(public: bytes, nonce: bytes, node_id: str, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, _signed(nonce, node_id))
    except (InvalidSignature, ValueError):
        return False
    return True
