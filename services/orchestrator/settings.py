"""The orchestrator's settings (one frozen object; CLI > EDGESPLIT_* environment > defaults)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from services.orchestrator.logic import DecisionConfig, Policy
from shared.config import BusSettings
from shared.errors import ConfigError
from shared.messages import Segment
from shared.planning.precision import PrecisionPolicy


class OrchestratorSettings(BusSettings):
    """The orchestrator process. Units in field names."""

    shards_dir: Path = Field(description="shard store of the served model (`edgesplit shard`)")
    entry: str | None = Field(default=None, description="entry node (default: the retained plan's)")
    expect_nodes: tuple[str, ...] = Field(default=(), description="the first plan waits for these")
    policy: Policy = Field(default="adaptive", description="what may change after the first plan: "
                           "adaptive (anything), migrate (nodes only, same cut points), static (nothing)")  # fmt: skip
    first_plan: tuple[Segment, ...] = Field(default=(), description="start from this plan when it is "
                                            "feasible on the measured profile (`edgesplit scenario run` "
                                            "gives every policy the same one)")  # fmt: skip
    initial_wait_s: float = Field(default=30.0, ge=0, description="the first plan waits at most this long "
                                  "(after every expected node is measured) for every link between them")  # fmt: skip
    period_s: float = Field(default=5.0, gt=0, description="periodic re-evaluation (jittered)")
    jitter: float = Field(default=0.2, ge=0, lt=1, description="+- share of the period")
    follow_up_s: float = Field(default=1.0, gt=0, description="re-evaluate once this long after a "
                               "change trigger that decided keep")  # fmt: skip
    relative_threshold: float = Field(default=0.15, ge=0)
    dwell_s: float = Field(default=15.0, ge=0)
    horizon_s: float = Field(default=30.0, gt=0)
    min_horizon_tokens: float = Field(default=64.0, ge=0)
    switch_overhead_s: float = Field(default=0.2, ge=0)
    shard_load_bytes_per_s: float = Field(default=200e6, gt=0)
    rebuild_context_tokens: int = Field(default=128, ge=0, description="KV tokens per request in flight")
    alternatives: int = Field(default=4, ge=0, le=16)
    private_blocks: int = Field(default=0, ge=0, le=65_536, description="until a retained policy arrives")
    trusted_level: int = Field(default=0, ge=0, le=1_000)
    reviser_timeout_s: float = Field(default=10.0, gt=0)
    rollout_timeout_s: float = Field(default=90.0, gt=0)
    ready_timeout_s: float = Field(default=60.0, gt=0, description="READY deadline per rollout")
    profile_wait_s: float = Field(default=3.0, ge=0, description="wait for a profile newer than an event")
    observe_s: float = Field(default=10.0, gt=0, description="realised-effect window after a commit")
    retained_wait_s: float = Field(default=0.5, ge=0)
    precision_policy: PrecisionPolicy = Field(
        default_factory=PrecisionPolicy.exact,
        description="activation precisions each hop may use, as JSON (docs/PLANNER.md, "
        "'Precision'); default exact: fp32 on every hop")  # fmt: skip

    @field_validator("precision_policy", mode="before")
    @classmethod
    def _policy_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"not JSON ({error.msg})") from None
        return value

    @field_validator("precision_policy")
    @classmethod
    def _activations_only(cls, value: PrecisionPolicy) -> PrecisionPolicy:
        if set(value.weights) != {"fp32"}:
            raise ValueError("weights: a running system holds its shard store's precision "
                             "(edgesplit shard --weights); the policy may choose activations only")  # fmt: skip
        return value

    def decision_config(self) -> DecisionConfig:
        return DecisionConfig(self.relative_threshold, self.dwell_s, self.horizon_s,
                              self.min_horizon_tokens, self.switch_overhead_s)  # fmt: skip


def parse_layout(text: str) -> tuple[Segment, ...]:
    """``gateway:0:1,edge1:1:6`` (node:start:end, half-open, in order) as segments.
    Raises ConfigError naming the part that is not of that form."""
    segments = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        node, _, rest = part.partition(":")
        start, _, end = rest.partition(":")
        try:
            segments.append(Segment(node=node, start=int(start), end=int(end)))  # type: ignore[arg-type]
        except ValueError:
            raise ConfigError(f"--first-plan: {part!r} is not node:start:end with start < end") from None
    if not segments:
        raise ConfigError("--first-plan: no segments (expected node:start:end,...)")
    for before, after in zip(segments, segments[1:], strict=False):
        if after.start != before.end:
            raise ConfigError(f"--first-plan: {after.node} starts at {after.start}, not where "
                              f"{before.node} ends ({before.end})")  # fmt: skip
    return tuple(segments)
