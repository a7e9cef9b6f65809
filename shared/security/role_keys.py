"""Per-role Ed25519 keys for control messages (issue #17, "signed by their role's key").

Each kind of control message has one role allowed to sign it (`SIGNER_OF`): the
broadcaster signs plans, epoch commands and the ledger; the orchestrator decisions and
rollout requests; the monitor NodeDown / NodeJoined; the operator the privacy policy and
emulation commands. Each signing role holds its own private key
(``KEYS/private/{role}.key``, PEM, 0600); every process holds only the public keys
(``KEYS/public/{role}.pub``, hex). A receiver with the public keys
(``EDGESPLIT_ROLE_KEYS_DIR``) accepts a control message only when it carries an Ed25519
signature of the role allowed for its kind; a signature of another role's key is refused
as ``{Kind}_role``, anything else as ``{Kind}_forged`` or ``{Kind}_unsigned``.

A worker, which must verify plans, holds no private key, so a compromised worker can no
longer sign a plan (with the single HMAC key of before it could). `edgesplit up --secure`
creates the keys in its state folder (`ensure_role_keys`). Without
``EDGESPLIT_ROLE_KEYS_DIR`` (the open laptop profile) the cluster HMAC key of
shared/security/signing.py signs and verifies, as before.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.config import BusSettings
from shared.errors import ConfigError
from shared.messages.base import Message, signing_bytes

SIGNING_ROLES = ("broadcaster", "orchestrator", "monitor", "operator")
SIGNER_OF: dict[str, str] = {
    "Plan": "broadcaster", "PrepareEpoch": "broadcaster", "CommitEpoch": "broadcaster",
    "AbortEpoch": "broadcaster", "EpochLedger": "broadcaster",
    "RolloutRequested": "orchestrator", "DecisionRecorded": "orchestrator",
    "NodeDown": "monitor", "NodeJoined": "monitor",
    "PrivacyPolicySet": "operator", "EmulationCommand": "operator",
}  # fmt: skip
"""The one role whose key may sign each control message kind."""
PREFIX = "ed25519:"
"""A role signature: the prefix, then the 64-byte signature in URL-safe base64 (96 chars)."""
KEYS_DIR = "keys"
"""The folder of the role keys in a state folder."""

M = TypeVar("M", bound=Message)


def private_key_file(keys: Path, role: str) -> Path:
    return keys / "private" / f"{role}.key"


def public_key_file(keys: Path, role: str) -> Path:
    return keys / "public" / f"{role}.pub"


def _create_pair(keys: Path, role: str) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    fd = os.open(private_key_file(keys, role), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public_key_file(keys, role).write_text(raw.hex() + "\n")


def ensure_role_keys(keys: Path) -> Path:
    """Create the key pair of every signing role under ``keys`` (private/ 0700 with 0600
    files, public/ readable); existing keys are kept. Returns ``keys``."""
    (keys / "private").mkdir(parents=True, exist_ok=True, mode=0o700)
    (keys / "public").mkdir(parents=True, exist_ok=True, mode=0o755)
    for role in SIGNING_ROLES:
        if not private_key_file(keys, role).exists():
            _create_pair(keys, role)
    return keys


def rotate_role_key(keys: Path, role: str, stamp: str) -> Path:
    """Replace ``role``'s key pair under ``keys`` by a new one. The old pair moves to
    ``keys/retired/{role}-{stamp}.key|.pub`` (0700 folder, the key 0600), never deleted
    and never overwritten. Returns the new public key file. ConfigError for a role that
    signs nothing, a folder without that role's key, or a ``stamp`` already used.

    Receivers read the public keys when they start: a process started before the rotation
    refuses what the new key signs (``forged``) and a restarted one what the old key
    signed, so restart every process with the new public keys (docs/SECURITY.md)."""
    if role not in SIGNING_ROLES:
        raise ConfigError(f"{role!r} has no signing key; the signing roles are {', '.join(SIGNING_ROLES)}")
    private, public = private_key_file(keys, role), public_key_file(keys, role)
    if not private.is_file() or not public.is_file():
        raise ConfigError(f"no key of {role} in {keys} to rotate (`edgesplit up --secure` creates them)")
    retired = keys / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    old_private, old_public = retired / f"{role}-{stamp}.key", retired / f"{role}-{stamp}.pub"
    if old_private.exists() or old_public.exists():
        raise ConfigError(f"{old_private} exists already; not overwriting it")
    private.rename(old_private)
    public.rename(old_public)
    _create_pair(keys, role)
    return public


@dataclass(frozen=True)
class RoleSigner:
    """Signs control messages with one role's private key."""

    role: str
    key: Ed25519PrivateKey

    def sign(self, message: M) -> M:
        """``message`` with its signature set (TypeError for a kind without one)."""
        if "signature" not in type(message).model_fields:
            raise TypeError(f"{message.kind} carries no signature")
        raw = self.key.sign(signing_bytes(message))
        return message.model_copy(update={"signature": PREFIX + base64.urlsafe_b64encode(raw).decode()})


@dataclass(frozen=True)
class RoleVerifier:
    """The public key of every signing role; judges a control message's signature."""

    keys: dict[str, Ed25519PublicKey]

    def why_refused(self, message: Message) -> str | None:
        """None when ``message`` is signed by the role allowed for its kind; else
        ``unsigned``, ``role`` (a valid signature of another role's key) or ``forged``."""
        signature = getattr(message, "signature", "")
        if not signature:
            return "unsigned"
        raw = _signature_bytes(signature)
        if raw is None:
            return "forged"  # not a role signature (an HMAC, or garbage)
        data = signing_bytes(message)
        allowed = SIGNER_OF.get(message.kind)
        if allowed is not None and _verifies(self.keys[allowed], raw, data):
            return None
        if any(_verifies(key, raw, data) for role, key in self.keys.items() if role != allowed):
            return "role"
        return "forged"


def _signature_bytes(signature: str) -> bytes | None:
    if not signature.startswith(PREFIX):
        return None
    try:
        raw = base64.urlsafe_b64decode(signature[len(PREFIX) :].encode())
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 64 else None


def _verifies(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def load_signer(path: Path) -> RoleSigner:
    """The signer whose private key is ``path`` (``{role}.key``). ConfigError for an
    unknown role, an unreadable file or a key that is not Ed25519."""
    role = path.stem
    if role not in SIGNING_ROLES:
        raise ConfigError(f"role key {path}: {role!r} is not a signing role ({', '.join(SIGNING_ROLES)})")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"role key {path} unreadable: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"role key {path} is not an Ed25519 key")
    return RoleSigner(role, key)


def load_verifier(keys: Path) -> RoleVerifier:
    """The public keys in ``keys``/public (or ``keys`` itself when it holds the .pub
    files). ConfigError when one is missing or malformed."""
    folder = keys / "public" if (keys / "public").is_dir() else keys
    found: dict[str, Ed25519PublicKey] = {}
    for role in SIGNING_ROLES:
        path = folder / f"{role}.pub"
        try:
            found[role] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(path.read_text().strip()))
        except (OSError, ValueError) as error:
            raise ConfigError(f"public key of {role} ({path}) unreadable: {error}") from None
    return RoleVerifier(found)


def role_verifier(settings: BusSettings) -> RoleVerifier | None:
    """The verifier of ``settings.role_keys_dir``; None when not set (HMAC profile)."""
    return load_verifier(settings.role_keys_dir) if settings.role_keys_dir is not None else None


def role_signer(settings: BusSettings) -> RoleSigner | None:
    """The signer of ``settings.role_key_file``; None when not set."""
    return load_signer(settings.role_key_file) if settings.role_key_file is not None else None
