"""Plans and the two-phase epoch protocol (broadcaster <-> workers)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from shared.ids import NodeIdField
from shared.messages.base import Epoch, Message, Segment, ShortText, Signature, sign, signature_ok

ManifestDigest = Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")]
"""A manifest.json sha256 in lower-case hex, or empty (not pinned)."""

# --- plans and epochs ---------------------------------------------------------------------


class Plan(Message):
    """A signed placement: segments in pipeline order. Retained on the plan topic."""

    epoch: Epoch
    model_id: ShortText
    entry_node: NodeIdField
    segments: tuple[Segment, ...] = Field(min_length=1, max_length=1024)
    manifest_sha256: ManifestDigest = ""
    """Hex sha256 of the shard store's manifest.json this plan was made for: a worker
    whose shards have another manifest refuses the plan (ManifestMismatch). Empty from an
    older sender: not pinned."""
    signature: Signature = ""
    """Hex HMAC-SHA256 of the plan without its signature (shared.messages.base.sign)."""

    def sign(self, key: str) -> Plan:
        """This plan with its signature set for ``key``."""
        return sign(self, key)

    def signature_ok(self, key: str) -> bool:
        """True when the plan is signed with ``key`` (constant-time comparison)."""
        return signature_ok(self, key)


class PrepareEpoch(Message):
    """Command: load the shards of ``plan`` while still serving the current epoch."""

    epoch: Epoch
    plan: Plan
    ready_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    frame_key: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    """Hex key that authenticates the epoch's data-plane frames (shared/security/frame_keys.py);
    empty from an older broadcaster: the worker derives it from the plan."""
    signature: Signature = ""


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
    signature: Signature = ""


class AbortEpoch(Message):
    """Command: drop what was prepared for ``epoch``; stay on the current one."""

    epoch: Epoch
    reason: ShortText
    signature: Signature = ""
