"""Node authentication: an HMAC over the orchestrator's fresh nonce, never a replayable token."""

from __future__ import annotations

import hashlib
import hmac


def node_mac(secret: str, nonce: bytes, node_id: str) -> bytes:
    return hmac.new(secret.encode(), nonce + b"\0" + node_id.encode(), hashlib.sha256).digest()


def verify_node_mac(secret: str, nonce: bytes, node_id: str, mac: bytes) -> bool:
    return hmac.compare_digest(mac, node_mac(secret, nonce, node_id))


def orchestrator_mac(secret: str, nonce: bytes, node_id: str) -> bytes:
    """The orchestrator's proof to a node (a different message, so one side's answer can
    never be replayed as the other's)."""
    return hmac.new(secret.encode(), b"orchestrator\0" + nonce + b"\0" + node_id.encode(), hashlib.sha256).digest()
