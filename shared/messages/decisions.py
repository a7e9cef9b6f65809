"""Orchestrator decision records."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.ids import NodeIdField
from shared.messages.base import (
    Epoch,
    Message,
    NonNegativeFloat,
    NonNegativeInt,
    Part,
    Segment,
    ShortText,
    Signature,
)
from shared.messages.monitor import Evidence


class Candidate(Part):
    summary: ShortText
    """Segments as text, e.g. "car-1[0,4) rsu-1[4,30)"."""
    predicted_latency_s: NonNegativeFloat
    """Predicted time per output token on the profile of the decision (0 when infeasible)."""
    migration_cost_s: NonNegativeFloat = 0.0
    # The orchestrator's view of the candidate (docs/ORCHESTRATOR.md).
    kind: Literal["current", "migrate", "resplit"] = "resplit"
    origin: Literal["running", "reviser", "migration"] = "reviser"
    segments: tuple[Segment, ...] = Field(default=(), max_length=1024)
    bottleneck_s: NonNegativeFloat = 0.0
    feasible: bool = True
    predicted_gain_s: float = 0.0
    """Time saved over the horizon against the running plan, seconds."""
    note: ShortText = ""
    """Why it was (not) eligible: threshold, cost, a violated constraint."""


class DecisionRecorded(Message):
    """Event: what the orchestrator decided and why (retained; shown by `status`).

    Published when decided (``outcome`` "none" for keep, "pending" for a rollout), again
    when the rollout ended ("committed" / "aborted" / "failed"), and once more with the
    realised effect (``realised_tpot_s``) after the observation window.
    """

    decision_id: NonNegativeInt
    trigger: ShortText
    candidates: tuple[Candidate, ...] = Field(default=(), max_length=256)
    action: Literal["keep", "migrate", "resplit"]
    predicted_gain_s: float = 0.0
    """Predicted time saved over the horizon by the chosen plan, seconds (before cost)."""
    from_epoch: Epoch | None = None
    to_epoch: Epoch | None = None
    realised_gain_s: float | None = None
    """(baseline_tpot_s - realised_tpot_s) x horizon_tokens: the saving that happened."""
    # Evidence, prediction and outcome (docs/ORCHESTRATOR.md).
    at_s: NonNegativeFloat = 0.0
    """Unix time of the decision."""
    evidence: tuple[Evidence, ...] = Field(default=(), max_length=16)
    trigger_detail: ShortText = ""
    emergency: bool = False
    """True when a hard constraint was violated: threshold and dwell were skipped."""
    reason: ShortText = ""
    chosen: NonNegativeInt | None = None
    """Index of the chosen plan in ``candidates`` (None: keep)."""
    current_latency_s: NonNegativeFloat | None = None
    """The running plan's predicted time per token on this profile (None: none or infeasible)."""
    predicted_latency_s: NonNegativeFloat | None = None
    """The chosen plan's predicted time per token."""
    predicted_cost_s: NonNegativeFloat = 0.0
    """One-off migration cost of the chosen plan plus the switch overhead, seconds."""
    horizon_tokens: NonNegativeFloat = 0.0
    nodes: tuple[NodeIdField, ...] = Field(default=(), max_length=1024)
    """The subset of nodes the plan in force after this decision uses."""
    outcome: Literal["none", "pending", "committed", "aborted", "failed"] = "none"
    outcome_detail: ShortText = ""
    baseline_tpot_s: NonNegativeFloat | None = None
    """Mean time per output token of requests before the decision (measured)."""
    realised_tpot_s: NonNegativeFloat | None = None
    """Mean time per output token of requests that started after the commit (measured)."""
    realised_requests: NonNegativeInt = 0
    revision: NonNegativeInt = 0
    """How often this decision's record was published: 1 as decided, one more with each
    republication (the rollout's outcome, the realised effect). Receivers refuse a record
    whose (decision_id, revision) is not newer than the one they saw (a replay)."""
    issued_at_s: NonNegativeFloat = 0.0
    """Unix time this revision was published, stamped and signed by the publishing bus
    (``at_s`` stays the time of the decision): receivers refuse a live record older than
    ``max_message_age_s``; a record read as retained state is not age-checked."""
    signature: Signature = ""
