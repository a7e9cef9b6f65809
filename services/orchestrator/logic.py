"""The orchestrator's decision, pure: keep, migrate or re-split (no I/O, no clock).

``decide(state, trigger, candidates, now_s)`` looks at the running plan re-evaluated on
the newest capacity profile (the candidate of kind ``current``) and the alternatives
(migrations that keep the cut points, re-splits from the split reviser) and returns one
`Decision`. The rule (docs/ORCHESTRATOR.md):

1. No running plan: take the best feasible candidate (the initial plan).
2. The running plan violates a hard constraint (a node gone, a missing link, a privacy
   rule it breaks): take the best feasible candidate now; threshold and dwell are
   skipped (the emergency bypass).
3. Otherwise a candidate is eligible when it saves at least ``relative_threshold`` of the
   running plan's time per token (``recent_factor`` times that while the last change is
   less than ``recent_window_s`` old: hysteresis, so measurement noise that could
   justify one change cannot justify a second one) and its saving over the horizon
   beats its migration cost. The eligible candidate with the largest net gain wins, but
   only once ``dwell_s`` passed since the last change; else keep.
4. A ``prediction_missed`` trigger (requests under the running plan took far longer per
   token than it predicted: the change was decided on a profile that was wrong) waives
   the dwell and the hysteresis, not the threshold: the next plan is judged on the
   fresher profile as if no recent change had happened.

Every number is deterministic: candidates are ranked by (value, segments), never by
arrival order, so the same inputs always give the same decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from shared.messages import Evidence, Segment

Action = Literal["keep", "migrate", "resplit"]
CandidateKind = Literal["current", "migrate", "resplit"]


@dataclass(frozen=True)
class DecisionConfig:
    """The knobs of the rule (units in names)."""

    relative_threshold: float = 0.15
    """A change must save at least this share of the running plan's time per token."""
    dwell_s: float = 15.0
    """No non-emergency change sooner than this after the last one."""
    horizon_s: float = 30.0
    """The gain of a change is counted over this much serving time ..."""
    min_horizon_tokens: float = 64.0
    """... and over at least this many tokens (an idle system still gets a fair horizon)."""
    switch_overhead_s: float = 0.2
    """One-off cost of any switch (prepare / commit round trips, replays), seconds."""
    recent_factor: float = 2.0
    """Threshold multiplier while the last change is less than recent_window_s old."""
    recent_window_s: float = 120.0


@dataclass(frozen=True)
class Trigger:
    """Why the orchestrator evaluates now (an event, the period, a policy change)."""

    kind: str
    """initial, periodic, node_down, node_joined, node_overloaded, node_overload_cleared,
    link_degraded, link_recovered, policy_changed, profile_event, rollout_aborted,
    plan_degraded, plan_infeasible, prediction_missed, follow_up."""
    at_s: float
    emergency: bool = False
    detail: str = ""
    evidence: tuple[Evidence, ...] = ()


Stage = tuple[float, float | None]
"""A serial stage of a plan: (seconds one request's decode step holds it, batch scaling)."""


@dataclass(frozen=True)
class CandidatePlan:
    """A plan evaluated on the current profile. Times are seconds (per token, except the
    one-off ``migration_cost_s``)."""

    kind: CandidateKind
    segments: tuple[Segment, ...]
    latency_s: float
    """Predicted time per output token with the requests now in flight (what decides)."""
    bottleneck_s: float
    migration_cost_s: float = 0.0
    violations: tuple[str, ...] = ()
    origin: Literal["running", "reviser", "migration"] = "reviser"
    unloaded_s: float | None = None
    """The planner's latency of one request alone (None: the same as ``latency_s``)."""
    serial_s: float = 0.0
    """The longest time one request's step holds a resource that serves one step at a
    time: a node's compute of its segment, or a link's bytes / bandwidth."""
    link_precisions: tuple[tuple[int, str], ...] = ()
    """Lossy hops as (block the frames enter, activation precision); the plan carries them."""
    stages: tuple[Stage, ...] = ()
    """Every serial stage as (seconds of one request's step, batch scaling or None), what
    ``serial_s`` is the largest of; empty: ``serial_s`` alone, no batching gain."""

    def per_token_s(self, concurrency: float) -> float:
        """Predicted time per token with ``concurrency`` requests decoding together."""
        return per_token_s(self.latency_s if self.unloaded_s is None else self.unloaded_s,
                           self.serial_s, concurrency, self.stages)  # fmt: skip

    @property
    def feasible(self) -> bool:
        return not self.violations and math.isfinite(self.latency_s)


def per_token_s(latency_s: float, serial_s: float, concurrency: float,
                stages: tuple[Stage, ...] = ()) -> float:  # fmt: skip
    """Time per output token of each of ``concurrency`` requests decoding together: the
    latency of one request alone, unless the busiest serial resource takes longer per
    round (one step of every request: ``concurrency`` x ``serial_s``; with ``stages``,
    a node whose batch scaling s is measured runs the round as one batched step,
    t x (1 + s x (concurrency - 1)): `batched_round_s`)."""
    load = max(1.0, concurrency)
    if all(scaling is None for _, scaling in stages):
        return max(latency_s, load * serial_s)
    return max(latency_s, batched_round_s(stages, load))


def batched_round_s(stages: tuple[Stage, ...], concurrency: float) -> float:
    """The longest round of ``concurrency`` requests' steps over ``stages`` (seconds of one
    request's step, batch scaling s): t x (1 + s x (B - 1)) as one batched step, or B x t
    where s is None (a link's bytes, a node not measured: no gain assumed)."""
    load = max(1.0, concurrency)
    return max((load * t if s is None else t * (1.0 + s * (load - 1.0)) for t, s in stages), default=0.0)


@dataclass(frozen=True)
class OrchestratorState:
    """What the decision needs to remember between triggers."""

    segments: tuple[Segment, ...] = ()
    """The running plan (empty: none yet)."""
    epoch: int | None = None
    changed_at_s: float | None = None
    """When the last change was committed (Unix s; None: never by this orchestrator)."""
    first_plan_at_s: float | None = None
    """When the first plan (none was running) was committed: dwell counts from it, but it
    arms no hysteresis (it replaced no plan, so it is not a re-plan noise could repeat)."""
    tokens_per_s: float = 0.0
    """Observed output tokens per second (all requests), for the horizon."""
    overhead_s: float = 0.0
    """Measured time per token the plan model does not cover (head, sampling, streaming):
    the same for every plan, so it changes no ranking, but it is part of the relative
    saving and of the predicted time per token."""
    next_decision_id: int = 1


@dataclass(frozen=True)
class Scored:
    """A candidate with its numbers against the running plan."""

    candidate: CandidatePlan
    gain_per_token_s: float
    gain_s: float
    """Time saved over the horizon, seconds."""
    cost_s: float
    """One-off migration cost plus the switch overhead, seconds (0 for the running plan)."""
    threshold: float
    eligible: bool
    note: str

    @property
    def net_s(self) -> float:
        return self.gain_s - self.cost_s


@dataclass(frozen=True)
class Decision:
    """The outcome of one evaluation: what to do and every number behind it."""

    action: Action
    reason: str
    chosen: CandidatePlan | None
    current: CandidatePlan | None
    scored: tuple[Scored, ...] = field(default=())
    emergency: bool = False
    horizon_tokens: float = 0.0
    gain_s: float = 0.0
    cost_s: float = 0.0

    @property
    def changes_plan(self) -> bool:
        return self.action != "keep" and self.chosen is not None


def boundaries(segments: tuple[Segment, ...]) -> tuple[tuple[int, int], ...]:
    """The cut points of a plan: its [start, end) ranges in order."""
    return tuple((segment.start, segment.end) for segment in segments)


def classify(current: tuple[Segment, ...], candidate: tuple[Segment, ...],
             current_precisions: tuple[tuple[int, str], ...] = (),
             candidate_precisions: tuple[tuple[int, str], ...] = ()) -> Action:  # fmt: skip
    """keep (same plan), migrate (same cut points, other nodes; or the same segments with
    other hop precisions, ``link_precisions``) or resplit (new cuts)."""
    if tuple(candidate) == tuple(current):
        return "keep" if candidate_precisions == current_precisions else "migrate"
    if current and boundaries(current) == boundaries(candidate):
        return "migrate"
    return "resplit"


Policy = Literal["adaptive", "migrate", "static"]
"""What the orchestrator may change after the first plan (`edgesplit scenario run` compares
them): adaptive anything; migrate only which node holds a segment (the cut points stay);
static nothing (the first plan stays, whatever happens)."""


def allowed(policy: Policy, running: tuple[Segment, ...],
            candidates: tuple[CandidatePlan, ...]) -> tuple[CandidatePlan, ...]:  # fmt: skip
    """The candidates ``policy`` lets the decision choose from (the first plan: all)."""
    if not running or policy == "adaptive":
        return candidates
    if policy == "static":
        return tuple(c for c in candidates if c.kind == "current")
    return tuple(c for c in candidates if c.kind == "current" or classify(running, c.segments) == "migrate")


def describe(segments: tuple[Segment, ...]) -> str:
    """Segments as text, e.g. ``car[0,2) rsu[2,6)``."""
    return " ".join(f"{s.node}[{s.start},{s.end})" for s in segments)


def horizon_tokens(state: OrchestratorState, config: DecisionConfig) -> float:
    """Tokens a change's per-token saving is counted over."""
    return max(config.min_horizon_tokens, state.tokens_per_s * config.horizon_s)


def _rank_key(candidate: CandidatePlan) -> tuple[float, float, str]:
    return (candidate.latency_s, candidate.migration_cost_s, describe(candidate.segments))


WAIVES_DWELL = ("prediction_missed",)
"""Triggers that waive the dwell and the hysteresis (rule 4)."""


def threshold(state: OrchestratorState, now_s: float, config: DecisionConfig, *, waive: bool = False) -> float:
    """The relative saving a non-emergency change needs now (hysteresis after a change,
    unless ``waive``: the last change was decided on a wrong profile)."""
    changed = state.changed_at_s
    recent = (not waive and changed is not None and changed != state.first_plan_at_s
              and now_s - changed < config.recent_window_s)  # fmt: skip
    return config.relative_threshold * (config.recent_factor if recent else 1.0)


def score(state: OrchestratorState, current: CandidatePlan, candidate: CandidatePlan,
          now_s: float, config: DecisionConfig, *, waive: bool = False) -> Scored:  # fmt: skip
    """``candidate``'s gain over the horizon and cost against the running plan ``current``."""
    tokens = horizon_tokens(state, config)
    if candidate.segments == current.segments and candidate.link_precisions == current.link_precisions:
        return Scored(candidate, 0.0, 0.0, 0.0, 0.0, False, "the running plan")
    if not candidate.feasible:
        return Scored(candidate, 0.0, 0.0, 0.0, 0.0, False, _first(candidate.violations))
    per_token = current.latency_s - candidate.latency_s
    gain = per_token * tokens
    cost = candidate.migration_cost_s + config.switch_overhead_s
    needed = threshold(state, now_s, config, waive=waive)
    total = current.latency_s + state.overhead_s
    relative = per_token / total if total > 0 else 0.0
    if candidate.segments == current.segments and more_exact(current.link_precisions, candidate.link_precisions):
        return _back_to_exact(candidate, per_token, gain, cost, relative, config.relative_threshold)
    if relative < needed:
        note = f"saves {relative:.1%} per token, below the {needed:.0%} threshold"
        return Scored(candidate, per_token, gain, cost, needed, False, note)
    if gain <= cost:
        note = f"gain {gain:.3f} s over {tokens:.0f} tokens does not beat cost {cost:.3f} s"
        return Scored(candidate, per_token, gain, cost, needed, False, note)
    note = f"saves {relative:.1%} per token, net {gain - cost:.3f} s"
    return Scored(candidate, per_token, gain, cost, needed, True, note)


EXACTNESS = {"fp32": 0, "fp16": 1, "bf16": 1, "int8": 2}
"""Loss rank of an activation precision (0: exact); an unknown one ranks lossiest."""


def more_exact(current: tuple[tuple[int, str], ...], candidate: tuple[tuple[int, str], ...]) -> bool:
    """True when ``candidate``'s hop precisions (``link_precisions``: lossy hops only) are
    at least as exact as ``current``'s on every hop and more exact on one."""
    now, then = dict(current), dict(candidate)
    ranks = [(EXACTNESS.get(now.get(hop, "fp32"), 3), EXACTNESS.get(then.get(hop, "fp32"), 3))
             for hop in now.keys() | then.keys()]  # fmt: skip
    return all(new <= old for old, new in ranks) and any(new < old for old, new in ranks)


def _back_to_exact(candidate: CandidatePlan, per_token: float, gain: float, cost: float,
                   relative: float, base_threshold: float) -> Scored:  # fmt: skip
    """The running plan with more exact hops (a link recovered): answers then lose less, a
    gain no time prices, so it needs no time saving, only that it costs less than the
    base threshold per token; compressing needs a saving of that share of the exact
    plan's time, going back a cost below that share of the compressed plan's, so the
    two never flap between each other on one profile."""
    if -relative >= base_threshold:
        note = f"more exact hops would cost {-relative:.1%} per token, at or over the {base_threshold:.0%} threshold"
        return Scored(candidate, per_token, gain, cost, base_threshold, False, note)
    note = f"back to more exact hops: costs {max(0.0, -relative):.1%} per token, under the {base_threshold:.0%} threshold"
    return Scored(candidate, per_token, gain, cost, base_threshold, True, note)


def _first(violations: tuple[str, ...]) -> str:
    return violations[0] if violations else "no finite prediction"


def decide(state: OrchestratorState, trigger: Trigger, candidates: tuple[CandidatePlan, ...],
           now_s: float, config: DecisionConfig | None = None) -> Decision:  # fmt: skip
    """One decision over the candidates (the running plan, if any, is the one of kind
    ``current``). Pure and deterministic; see the module docstring for the rule."""
    config = config or DecisionConfig()
    tokens = horizon_tokens(state, config)
    current = next((c for c in candidates if c.kind == "current"), None)
    others = sorted((c for c in candidates if c.kind != "current"), key=_rank_key)
    feasible = [c for c in others if c.feasible]
    if not state.segments or current is None:
        return _forced(state, None, feasible, "initial plan", trigger, tokens, emergency=False)
    if not current.feasible:
        why = f"the running plan is infeasible: {_first(current.violations)}"
        return _forced(state, current, feasible, why, trigger, tokens, emergency=True)
    waive = trigger.kind in WAIVES_DWELL
    scored = tuple(score(state, current, c, now_s, config, waive=waive) for c in others)
    eligible = sorted((s for s in scored if s.eligible),
                      key=lambda s: (-s.net_s, *_rank_key(s.candidate)))  # fmt: skip
    base = Decision("keep", "", None, current, scored, False, tokens)
    if not eligible:
        best = min(scored, key=lambda s: _rank_key(s.candidate), default=None)
        why = f"best alternative {best.note}" if best else "no alternative plan"
        return replace(base, reason=f"keep: {why}")
    winner = eligible[0]
    if not waive and state.changed_at_s is not None and now_s - state.changed_at_s < config.dwell_s:
        waited = now_s - state.changed_at_s
        return replace(base, reason=f"keep: dwell ({waited:.1f} s since the last change < "
                                    f"{config.dwell_s:g} s); best {winner.note}")  # fmt: skip
    action = classify(state.segments, winner.candidate.segments, current.link_precisions,
                      winner.candidate.link_precisions)  # fmt: skip
    return replace(base, action=action, chosen=winner.candidate, gain_s=winner.gain_s,
                   cost_s=winner.cost_s, reason=f"{action}: {winner.note}")  # fmt: skip


def _forced(state: OrchestratorState, current: CandidatePlan | None,
            feasible: list[CandidatePlan], why: str, trigger: Trigger, tokens: float,
            *, emergency: bool) -> Decision:  # fmt: skip
    """Take the best feasible candidate without threshold or dwell (initial or emergency)."""
    scored = tuple(Scored(c, 0.0, 0.0, c.migration_cost_s, 0.0, True, "forced") for c in feasible)
    if not feasible:
        return Decision("keep", f"{why}; no feasible plan to move to", None, current, scored,
                        emergency, tokens)  # fmt: skip
    chosen = feasible[0]
    action = classify(state.segments, chosen.segments, current.link_precisions if current else (),
                      chosen.link_precisions)  # fmt: skip
    if action == "keep":  # the running plan came back as the best: nothing to do
        return Decision("keep", f"{why}; the best plan is the running one", None, current,
                        scored, emergency, tokens)  # fmt: skip
    gain = 0.0
    if current is not None and math.isfinite(current.latency_s):
        gain = (current.latency_s - chosen.latency_s) * tokens
    return Decision(action, f"{action}: {why}", chosen, current, scored, emergency, tokens,
                    gain, chosen.migration_cost_s)  # fmt: skip


def after_commit(state: OrchestratorState, segments: tuple[Segment, ...], epoch: int,
                 now_s: float, *, initial: bool = False) -> OrchestratorState:  # fmt: skip
    """The state once a change to ``segments`` committed as ``epoch`` at ``now_s``;
    ``initial``: it was the first plan (nothing was running when it was decided)."""
    first = now_s if initial else state.first_plan_at_s
    return replace(state, segments=segments, epoch=epoch, changed_at_s=now_s, first_plan_at_s=first)
