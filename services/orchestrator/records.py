"""Decision records and the realised effect (pure): `DecisionRecorded` from a `Decision`,
triggers from monitor events, and the time-per-token tracker fed by finished requests."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

from services.orchestrator.logic import (
    CandidatePlan,
    Decision,
    OrchestratorState,
    Scored,
    Trigger,
    describe,
)
from shared.messages import (
    Candidate,
    DecisionRecorded,
    LinkDegraded,
    LinkRecovered,
    Message,
    NodeDown,
    NodeJoined,
    NodeOverloadCleared,
    NodeOverloaded,
    ProfileEvent,
    RequestFinished,
)

TEXT = 1024  # ShortText
MAX_CANDIDATES = 32


def trigger_of(event: Message, now_s: float) -> Trigger | None:
    """The trigger a monitor event raises (None for a kind the orchestrator ignores)."""
    if isinstance(event, NodeDown):
        return Trigger("node_down", event.at_s, event.emergency, f"{event.node} {event.reason}", event.evidence)
    if isinstance(event, NodeJoined):
        return Trigger("node_joined", event.at_s, False, event.node, event.evidence)
    if isinstance(event, NodeOverloaded):
        return Trigger("node_overloaded", event.at_s, False, event.node, event.evidence)
    if isinstance(event, NodeOverloadCleared):
        return Trigger("node_overload_cleared", event.at_s, False, event.node, event.evidence)
    if isinstance(event, LinkDegraded | LinkRecovered):
        kind = "link_degraded" if isinstance(event, LinkDegraded) else "link_recovered"
        return Trigger(kind, event.at_s, False, f"{event.src}->{event.dst} {event.metric}", event.evidence)
    if isinstance(event, ProfileEvent):
        detail = f"{event.event} {event.node or ''} {event.detail}".strip()
        return Trigger("profile_event", now_s, event.emergency, detail)
    return None


def merge(triggers: list[Trigger]) -> Trigger:
    """Triggers that arrived together as one: emergency if any is, kinds and details joined."""
    if len(triggers) == 1:
        return triggers[0]
    ordered = sorted(triggers, key=lambda t: (not t.emergency, t.at_s))
    kinds = "+".join(dict.fromkeys(t.kind for t in ordered))
    detail = "; ".join(t.detail for t in ordered if t.detail)
    evidence = tuple(e for t in ordered for e in t.evidence)[:16]
    return Trigger(kinds[:TEXT], max(t.at_s for t in triggers), any(t.emergency for t in triggers),
                   detail[:TEXT], evidence)  # fmt: skip


def _finite(value: float) -> float:
    return value if math.isfinite(value) and value >= 0 else 0.0


def _candidate(scored: Scored) -> Candidate:
    plan: CandidatePlan = scored.candidate
    return Candidate(
        summary=describe(plan.segments)[:TEXT], predicted_latency_s=_finite(plan.latency_s),
        migration_cost_s=_finite(plan.migration_cost_s), kind=plan.kind, origin=plan.origin,
        segments=plan.segments, bottleneck_s=_finite(plan.bottleneck_s), feasible=plan.feasible,
        predicted_gain_s=scored.gain_s if math.isfinite(scored.gain_s) else 0.0,
        note=scored.note[:TEXT],
    )  # fmt: skip


def record_of(decision_id: int, trigger: Trigger, decision: Decision, now_s: float,
              epoch: int | None, running_nodes: tuple[str, ...],
              overhead_s: float = 0.0, load: float | None = None) -> DecisionRecorded:  # fmt: skip
    """The record of a decision as decided (before any rollout). Predicted times per token
    include the measured ``overhead_s`` the plan model does not cover; ``load`` (the
    requests in flight the candidates were priced for) is named in the reason."""
    entries: list[Scored] = []
    if decision.current is not None:
        entries.append(Scored(decision.current, 0.0, 0.0, 0.0, 0.0, False, "the running plan"))
    entries += [s for s in decision.scored if s.candidate.kind != "current"][: MAX_CANDIDATES - 1]
    candidates = tuple(_candidate(s) for s in entries)
    chosen = None
    if decision.chosen is not None:
        chosen = next((i for i, s in enumerate(entries) if s.candidate.segments == decision.chosen.segments), None)
    current = decision.current
    nodes = tuple(dict.fromkeys(s.node for s in decision.chosen.segments)) if decision.chosen else running_nodes
    return DecisionRecorded(
        decision_id=decision_id, trigger=trigger.kind[:TEXT], trigger_detail=trigger.detail[:TEXT],
        evidence=trigger.evidence[:16], candidates=candidates, action=decision.action,
        predicted_gain_s=decision.gain_s if math.isfinite(decision.gain_s) else 0.0,
        from_epoch=epoch, at_s=now_s, emergency=decision.emergency,
        reason=(decision.reason if load is None else f"{decision.reason} [planned for {load:g} "
                f"request{'' if load == 1 else 's'} in flight]")[:TEXT],
        chosen=chosen,
        current_latency_s=current.latency_s + overhead_s if current is not None and current.feasible else None,
        predicted_latency_s=_finite(decision.chosen.latency_s) + overhead_s if decision.chosen else None,
        predicted_cost_s=_finite(decision.cost_s), horizon_tokens=decision.horizon_tokens,
        nodes=nodes, outcome="pending" if decision.changes_plan else "none",  # type: ignore[arg-type]
    )  # fmt: skip


@dataclass(frozen=True)
class Finished:
    """One finished request as the orchestrator saw it (Unix s; tpot in s)."""

    started_at_s: float
    finished_at_s: float
    tpot_s: float
    tokens: int


class TpotTracker:
    """Finished requests of the last ``keep_s`` seconds: token rate, TPOT before / after."""

    def __init__(self, keep_s: float = 300.0, size: int = 4096) -> None:
        self.keep_s = keep_s
        self._items: deque[Finished] = deque(maxlen=size)

    def add(self, finished: RequestFinished, now_s: float) -> None:
        tokens = finished.generated_tokens
        duration = finished.ttft_s + finished.tpot_s * max(0, tokens - 1)
        self._items.append(Finished(now_s - duration, now_s, finished.tpot_s, tokens))
        while self._items and now_s - self._items[0].finished_at_s > self.keep_s:
            self._items.popleft()

    def tokens_per_s(self, now_s: float, window_s: float = 30.0) -> float:
        """Output tokens per second finished over the last ``window_s``."""
        tokens = sum(f.tokens for f in self._items if now_s - f.finished_at_s <= window_s)
        return tokens / window_s

    def before(self, at_s: float, window_s: float) -> tuple[float | None, int]:
        """(mean TPOT, count) of multi-token requests that finished in [at_s - window_s, at_s]."""
        return _mean([f for f in self._items
                      if at_s - window_s <= f.finished_at_s <= at_s and f.tokens > 1])  # fmt: skip

    def concurrency(self, start_s: float, end_s: float) -> float:
        """Mean number of the tracked requests in flight over [start_s, end_s] (a request
        spanning the interval counts itself); 0 for an empty interval."""
        if end_s <= start_s:
            return 0.0
        overlap = math.fsum(max(0.0, min(end_s, f.finished_at_s) - max(start_s, f.started_at_s))
                            for f in self._items)  # fmt: skip
        return overlap / (end_s - start_s)

    def after(self, at_s: float) -> tuple[float | None, int]:
        """(mean TPOT, count) of multi-token requests that started after ``at_s``."""
        return _mean([f for f in self._items if f.started_at_s >= at_s and f.tokens > 1])


def _mean(items: list[Finished]) -> tuple[float | None, int]:
    if not items:
        return None, 0
    return math.fsum(f.tpot_s for f in items) / len(items), len(items)


DECISION_IDS_PER_S = 1000
"""`first_decision_id`: the clock floor counts milliseconds."""


def first_decision_id(now_s: float) -> int:
    """The first decision id of an orchestrator that found no retained records (the broker
    lost them, they did not arrive within ``retained_wait_s``, a failover elsewhere): the
    Unix time in milliseconds. Ids are consecutive from there, so any id an earlier
    orchestrator issued is below it unless that one decided more than once per
    millisecond on average over its whole life; receivers that lived through the restart
    accept the new records instead of refusing them as replays (docs/SECURITY.md)."""
    return max(1, int(now_s * DECISION_IDS_PER_S))


def restored(state: OrchestratorState, seen: list[DecisionRecorded]) -> OrchestratorState:
    """``state`` continued from the retained decisions of an earlier orchestrator: the next
    decision id, and when the last change committed (so dwell and hysteresis survive)."""
    committed = [r for r in seen if r.outcome == "committed" and r.action != "keep"]
    last = max(committed, key=lambda r: r.at_s, default=None)
    return replace(state, next_decision_id=max(r.decision_id for r in seen) + 1,
                   changed_at_s=last.at_s if last else None,
                   first_plan_at_s=last.at_s if last and last.from_epoch is None else None)  # fmt: skip


def held_back(decision: Decision) -> bool:
    """True when an alternative beat the threshold but was held back (dwell or cost)."""
    held = any(not s.eligible and "does not beat cost" in s.note for s in decision.scored)
    return held or decision.reason.startswith("keep: dwell")


def watch_trigger(current: CandidatePlan, reference_s: float, threshold: float, at_s: float) -> Trigger | None:
    """The trigger the running plan re-evaluated on a new profile raises: ``plan_infeasible``
    (emergency) when it violates a constraint, ``plan_degraded`` when its predicted time per
    token exceeds ``reference_s`` (at the last decision) by ``threshold``; else None."""
    if not current.feasible:
        why = current.violations[0] if current.violations else "unknown"
        return Trigger("plan_infeasible", at_s, True, f"the running plan is infeasible: {why}"[:TEXT])
    if current.latency_s > reference_s * (1 + threshold):
        detail = f"running plan predicted {current.latency_s * 1e3:.2f} ms/token, was {reference_s * 1e3:.2f}"
        return Trigger("plan_degraded", at_s, False, detail)
    return None


MISS_FACTOR = 3.0
MISS_MIN_S = 0.1
"""A request missed the prediction when its TPOT exceeds MISS_FACTOR x the predicted one
and by MISS_MIN_S more (a millisecond-scale plan on a loaded machine easily runs 2x; the
misses this is for were 650 ms against 85 predicted)."""
MISS_SETTLE_S = 0.5
"""Only requests that started this long after the commit count (the others ran partly
under the old plan and through the switch)."""


def prediction_missed(finished: RequestFinished, now_s: float, committed_at_s: float | None,
                      predicted_s: float) -> Trigger | None:  # fmt: skip
    """The trigger a finished request raises when it ran entirely under the running plan
    and took far longer per token than the plan predicted (``predicted_s``, overhead
    included): the profile the plan was chosen on was wrong (a link estimate that had
    not caught up), so the next decision should not wait for the dwell. None otherwise."""
    if committed_at_s is None or finished.generated_tokens < 2 or not math.isfinite(predicted_s):
        return None
    duration_s = finished.ttft_s + finished.tpot_s * (finished.generated_tokens - 1)
    if now_s - duration_s < committed_at_s + MISS_SETTLE_S:
        return None
    if finished.tpot_s <= max(MISS_FACTOR * predicted_s, predicted_s + MISS_MIN_S):
        return None
    detail = (f"a request ran {finished.tpot_s * 1e3:.0f} ms/token under the running plan, "
              f"predicted {predicted_s * 1e3:.0f}")  # fmt: skip
    return Trigger("prediction_missed", now_s, False, detail[:TEXT])

