"""Plans and the two-phase epoch protocol (broadcaster <-> workers)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from shared.ids import NodeIdField
from shared.messages.base import (
    Epoch,
    Message,
    NonNegativeInt,
    Part,
    Segment,
    ShortText,
    Signature,
    sign,
    signature_ok,
)

ManifestDigest = Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")]
"""A manifest.json sha256 in lower-case hex, or empty (not pinned)."""

# --- plans and epochs ---------------------------------------------------------------------


class LinkPrecision(Part):
    """The activation frames entering block ``target`` travel at ``activations``
    (``target`` = the model's block count: the final hidden state back to the entry)."""

    target: NonNegativeInt
    activations: Literal["fp32", "fp16", "int8"]


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
    link_precisions: tuple[LinkPrecision, ...] = Field(default=(), max_length=1025)
    """The planner's activation precision per hop, by the block the frames enter; a hop not
    listed (and every hop of a plan from an older sender) uses the sender's own
    ``--activation-precision`` (fp32 by default: exact)."""
    signature: Signature = ""
    """Hex HMAC-SHA256 of the plan without its signature (shared.messages.base.sign)."""

    @model_validator(mode="after")
    def _hops_of_this_plan(self) -> Plan:
        targets = [entry.target for entry in self.link_precisions]
        if len(set(targets)) != len(targets):
            raise ValueError("link_precisions: a target is listed twice")
        hops = {segment.start for segment in self.segments} | {self.segments[-1].end}
        for target in targets:
            if target not in hops:
                raise ValueError(f"link_precisions: block {target} starts no segment of the plan "
                                 "and is not its end")  # fmt: skip
        return self

    def activations_for(self, target: int) -> str | None:
        """The precision the plan names for frames entering block ``target`` (None: not named)."""
        return next((e.activations for e in self.link_precisions if e.target == target), None)

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
