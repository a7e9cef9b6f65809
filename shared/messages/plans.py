"""Plans and the two-phase epoch protocol (broadcaster <-> workers)."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

import msgpack
from pydantic import Field

from shared.ids import NodeIdField
from shared.messages.base import Epoch, Message, Segment, ShortText

# --- plans and epochs ---------------------------------------------------------------------


class Plan(Message):
    """A signed placement: segments in pipeline order. Retained on the plan topic."""

    epoch: Epoch
    model_id: ShortText
    entry_node: NodeIdField
    segments: tuple[Segment, ...] = Field(min_length=1, max_length=1024)
    signature: str = ""
    """Hex HMAC-SHA256 of the plan without its signature (see `sign` / `signature_ok`)."""

    def signing_bytes(self) -> bytes:
        """Canonical bytes the signature covers (everything but the signature)."""
        packed: bytes = msgpack.packb(self.model_dump(exclude={"signature"}), use_bin_type=True)
        return packed

    def sign(self, key: str) -> Plan:
        """This plan with its signature set for ``key``."""
        digest = hmac.new(key.encode(), self.signing_bytes(), hashlib.sha256).hexdigest()
        return self.model_copy(update={"signature": digest})

    def signature_ok(self, key: str) -> bool:
        """True when the plan is signed with ``key`` (constant-time comparison)."""
        expected = hmac.new(key.encode(), self.signing_bytes(), hashlib.sha256).hexdigest()
        return bool(self.signature) and hmac.compare_digest(expected, self.signature)


class PrepareEpoch(Message):
    """Command: load the shards of ``plan`` while still serving the current epoch."""

    epoch: Epoch
    plan: Plan
    ready_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    frame_key: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    """Hex key that authenticates the epoch's data-plane frames (shared/security/frame_keys.py);
    empty from an older broadcaster: the worker derives it from the plan."""


class EpochReady(Message):
    """Event: ``node`` holds its shards for ``epoch`` (READY ack)."""

    epoch: Epoch
    node: NodeIdField


class EpochRejected(Message):
    """Event: ``node`` cannot take ``epoch`` (NACK)."""

    epoch: Epoch
    node: NodeIdField
    reason: ShortText


class CommitEpoch(Message):
    """Command: switch to ``epoch`` at the next token boundary."""

    epoch: Epoch


class AbortEpoch(Message):
    """Command: drop what was prepared for ``epoch``; stay on the current one."""

    epoch: Epoch
    reason: ShortText
