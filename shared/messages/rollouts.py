"""Roll-out requests and results between the orchestrator and the broadcaster."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shared.messages.base import (
    Epoch,
    Message,
    NonNegativeFloat,
    NonNegativeInt,
    ShortText,
    Signature,
)
from shared.messages.plans import Plan

# --- reconfiguration broadcast -------------------------------------------------------------


class RolloutRequested(Message):
    """Command to the broadcaster: roll ``plan`` out as the next epoch (two-phase).

    The broadcaster assigns the epoch (``plan.epoch`` is ignored) and signs the plan.
    """

    decision_id: NonNegativeInt
    plan: Plan
    reason: ShortText = ""
    ready_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    signature: Signature = ""
    """The orchestrator's signature: the broadcaster rolls out only signed requests."""


class RolloutFinished(Message):
    """Event: how a rollout ended. ``committed`` means every node of the plan was READY
    and COMMIT was published; ``aborted`` means a NACK or a READY timeout, and every node
    stays on ``previous_epoch``."""

    decision_id: NonNegativeInt
    epoch: Epoch
    previous_epoch: Epoch
    outcome: Literal["committed", "aborted"]
    reason: ShortText = ""
    prepare_s: NonNegativeFloat = 0.0
    """From PREPARE to the last READY (or to the abort)."""


class EpochLedger(Message):
    """The broadcaster's retained record of epoch numbering, so a restart neither reuses an
    epoch number (an aborted one is burned: workers may have prepared it) nor leaves a
    rollout half-prepared. Written before PREPARE and after COMMIT / ABORT."""

    highest_epoch: Epoch
    """The highest epoch number ever used (committed or aborted)."""
    in_progress: Epoch | None = None
    """The epoch being rolled out (PREPARE sent, no COMMIT / ABORT yet), if any."""
    decision_id: NonNegativeInt | None = None
    """The decision of the rollout in progress."""
    previous_epoch: Epoch = 0
    """The committed epoch when the rollout in progress started."""
    signature: Signature = ""
