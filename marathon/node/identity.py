"""A node's identity: its id, and the credential it proves itself with — its own Ed25519 key
(``<data_dir>/node_credential``, 0600; the orchestrator keeps only the public half), enrolled
once with a join token — or, in the embedded and single-operator setups, the shared node secret."""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import uuid

import msgspec

from marathon.config import Config, state_value
from marathon.errors import AuthError, ConfigError, ProtocolError
from marathon.protocol import messages as m
from marathon.protocol.auth import join_mac, node_mac, node_signature, orchestrator_mac, public_key
from marathon.protocol.auth import split_token, token_hash

log = logging.getLogger("marathon.node")


def load_node_id(config: Config) -> str:
    return config.node_id or state_value(config.data_dir, "node_id", lambda: f"n-{uuid.uuid4().hex[:12]}")


CREDENTIAL_FILE = "node_credential"


class NodeCredential(msgspec.Struct):
    """This node's own identity, in ``<data_dir>/node_credential`` (0600): the private key it
    signs its handshakes with (the orchestrator has only the public half) and the key the
    orchestrator proves itself with (``server_key``, empty until enrolment completes)."""

    node_id: str
    private_key: bytes
    server_key: bytes = b""


def credential_path(config: Config) -> str:
    return os.path.join(config.data_dir, CREDENTIAL_FILE)


def load_credential(config: Config) -> NodeCredential | None:
    try:
        with open(credential_path(config), "rb") as f:
            return msgspec.json.decode(f.read(), type=NodeCredential)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ConfigError(
            f"{credential_path(config)}: unreadable node credential ({exc}); remove it and join again"
        ) from None


def save_credential(config: Config, cred: NodeCredential) -> None:
    """Written whole (a temporary file renamed over it), mode 0600 from the start."""
    path = credential_path(config)
    os.makedirs(config.data_dir, mode=0o711, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.encode(cred))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def prove(
    auth: m.Authenticate, config: Config, secret: str, cred: NodeCredential | None, challenge: bytes
) -> m.Authenticate:
    """Our proof: a signature with our own key (and, until enrolment completes, the join
    token's proof), or else the shared secret's HMAC."""
    if cred is None:
        return msgspec.structs.replace(auth, mac=node_mac(secret, challenge, auth.node_id))
    pub = public_key(cred.private_key)
    auth = msgspec.structs.replace(
        auth, public_key=pub, signature=node_signature(cred.private_key, challenge, auth.node_id)
    )
    if not cred.server_key:  # enrolling (or the orchestrator's answer to it was lost)
        parts = split_token(config.join_token)
        if parts is None:
            raise ConfigError("join_token is not a join token (mjt_…): make one with `marathon nodes join-token`")
        auth = msgspec.structs.replace(
            auth, join_id=parts[0], join_mac=join_mac(config.join_token, challenge, auth.node_id, pub)
        )
    return auth


def check_welcome(
    welcome: m.Welcome,
    nonce: bytes,
    node_id: str,
    config: Config,
    secret: str,
    cred: NodeCredential | None,
    gateway: str,
) -> NodeCredential | None:
    """The orchestrator's proof: the shared secret, the key it gave us at enrolment, or
    (enrolling) the join token's hash; a key given at enrolment is kept from now on (the
    credential to use from now on is returned)."""
    if cred is None:
        key, what = secret, "the node secret"
    elif cred.server_key:
        key, what = cred.server_key.hex(), "this node's enrolment"
    else:
        key, what = token_hash(config.join_token), "the join token"
    if not hmac.compare_digest(welcome.mac, orchestrator_mac(key, nonce, node_id)):
        raise AuthError(f"{gateway} did not prove {what}: not our orchestrator")
    if cred is not None and not cred.server_key:
        if len(welcome.server_key) != 32:
            raise ProtocolError("the orchestrator enrolled this node without a key to prove itself with")
        cred = msgspec.structs.replace(cred, server_key=welcome.server_key)
        save_credential(config, cred)
        log.info("enrolled with the join token: credential kept in %s", credential_path(config))
    if welcome.max_slots and welcome.max_slots < config.slots:
        log.warning(
            "this node has %d slots, but it is enrolled for at most %d: it gets no more tasks than that",
            config.slots,
            welcome.max_slots,
        )
    return cred
