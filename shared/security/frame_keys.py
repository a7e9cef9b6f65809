"""The per-epoch key that authenticates data-plane frames (docs/SECURITY.md, "Frames").

Every frame but a probe carries an HMAC-SHA256 (``mac``, shared/tensor_frame.py) under
the key of its epoch. The key is derived from the cluster's plan-signing secret and the
signed plan of that epoch, so it changes with every epoch and cannot be computed by a
broker client that lacks the secret. The broadcaster puts it in the epoch's PREPARE
(`PrepareEpoch.frame_key`); a worker that missed the PREPARE (a restart, or a plan the
launcher published directly) derives the same key from the retained plan it verifies.
"""

from __future__ import annotations

import hashlib
import hmac

from shared.errors import ConfigError

FRAME_KEY_BYTES = 32
_LABEL = b"edgesplit frame key v1\0"


def derive_frame_key(secret: str, epoch: int, plan_signature: str) -> bytes:
    """The frame key of ``epoch``: HMAC-SHA256(secret, label | epoch | plan signature).

    Raises ConfigError for an empty secret (a key anyone could compute).
    """
    if not secret:
        raise ConfigError("no plan-signing secret: frame keys cannot be derived")
    message = _LABEL + epoch.to_bytes(8, "big") + plan_signature.encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def parse_frame_key(text: str) -> bytes:
    """A frame key sent as hex (in a PREPARE). Raises ConfigError for anything but 32
    bytes of hex."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("frame key is not hex") from None
    if len(key) != FRAME_KEY_BYTES:
        raise ConfigError(f"frame key has {len(key)} bytes, not {FRAME_KEY_BYTES}")
    return key
