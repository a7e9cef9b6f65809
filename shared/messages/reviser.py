"""Plan requests to the split reviser and its proposals."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from shared.ids import NodeIdField, RequestIdField, TopicId
from shared.messages.base import Message, NonNegativeFloat, Part, Segment, ShortText
from shared.messages.monitor import CapacityProfile
from shared.messages.privacy import PrivacyPolicy
from shared.planning.precision import PrecisionPolicy

# --- split reviser ------------------------------------------------------------------------


class PlanWeights(Part):
    """Weights of the planner's richer objective terms (docs/PLANNER.md; all 0: latency)."""

    balance: NonNegativeFloat = 0.0
    privacy_s: NonNegativeFloat = 0.0
    migration: NonNegativeFloat = 0.0
    """Per-token seconds charged per second of one-off migration (1 / payback tokens)."""
    bottleneck_tolerance: NonNegativeFloat = 0.0


class PlanRequested(Message):
    """Command to the split reviser: plan ``model_id`` on the nodes and links of ``profile``.

    The answer (`PlanProposed`, same ``request_id``) goes to the reviser-replies topic of
    ``reply_to`` (a client or service id, never a raw topic string).
    """

    request_id: RequestIdField
    reply_to: TopicId
    model_id: ShortText
    source: NodeIdField
    """The entry node: it holds the embedding and head and receives the output."""
    profile: CapacityProfile
    privacy: PrivacyPolicy = PrivacyPolicy()
    """Hard trust rules: the policy in force (default: none)."""
    objective: Literal["latency", "throughput"] = "latency"
    weights: PlanWeights = PlanWeights()
    current_segments: tuple[Segment, ...] = Field(default=(), max_length=1024)
    """The running plan (empty: nothing loaded); migration costs are counted from it."""
    alternatives: Annotated[int, Field(ge=0, le=16)] = 0
    context_tokens: Annotated[int, Field(ge=0, le=2**24)] = 0
    """KV-cache tokens per request the memory constraint reserves."""
    concurrent_requests: Annotated[int, Field(ge=1, le=65_536)] = 1
    expected_batch: Annotated[float, Field(ge=1, le=65_536)] = 1.0
    """Requests whose decode steps run as one batch at every stage (the expected load):
    each node's compute is priced as its share of such a batch, at the profile's measured
    ``decode_batch_scaling`` (docs/PLANNER.md, "Batched decode"; 1: unbatched, the contract)."""
    method: Literal["auto", "exact", "fast"] = "auto"
    time_limit_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """The solver's budget for choosing its method (the reviser's own deadline applies too)."""
    precision: PrecisionPolicy | None = None
    """The precisions the search may give each hop's activations (docs/PLANNER.md,
    "Precision"; None: exact, fp32 everywhere, the contract's cost model)."""


class PlanOption(Part):
    """One plan and its predicted costs (seconds per token, migration one-off)."""

    segments: tuple[Segment, ...] = Field(min_length=1, max_length=1024)
    latency_s: NonNegativeFloat
    bottleneck_s: NonNegativeFloat
    migration_cost_s: NonNegativeFloat
    """One-off seconds to move from the request's current plan to this one."""
    weighted_cost_s: NonNegativeFloat
    """Latency plus the weighted extra terms: what the solver minimised."""


class PlanProposed(Message):
    """Event: the split reviser's answer to a `PlanRequested`.

    ``feasible`` with ``best`` and up to ``alternatives`` next-best distinct plans in
    objective order; otherwise ``reason`` says why, and ``error`` is set when the request
    itself could not be planned (invalid, timed out, failed) rather than having no plan.
    """

    request_id: RequestIdField
    feasible: bool
    reason: ShortText = ""
    error: Literal["invalid_request", "timeout", "internal"] | None = None
    objective: Literal["latency", "throughput"] = "latency"
    best: PlanOption | None = None
    alternatives: tuple[PlanOption, ...] = Field(default=(), max_length=16)
    method: Literal["exact", "fast"] | None = None
    optimal: bool = False
    """True when ``best`` is proven optimal."""
    solve_s: NonNegativeFloat = 0.0
    profile_as_of_s: NonNegativeFloat = 0.0
    """``as_of_s`` of the profile the plan was computed from."""

    @model_validator(mode="after")
    def _consistent(self) -> PlanProposed:
        if self.feasible != (self.best is not None):
            raise ValueError("a feasible answer has a best plan, an infeasible one has none")
        if self.error is not None and self.feasible:
            raise ValueError(f"an answer with error {self.error!r} cannot be feasible")
        return self
