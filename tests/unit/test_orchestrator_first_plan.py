"""The first plan arms the dwell but not the hysteresis: it replaced no running plan, so a
real change soon after start needs the base threshold, while a re-plan still doubles it."""

from __future__ import annotations

from services.orchestrator.logic import (
    CandidatePlan,
    DecisionConfig,
    OrchestratorState,
    Trigger,
    after_commit,
    decide,
    threshold,
)
from shared.messages import Segment

CONFIG = DecisionConfig(relative_threshold=0.15, dwell_s=15.0, min_horizon_tokens=100.0,
                        switch_overhead_s=0.1)  # fmt: skip
PERIODIC = Trigger("periodic", 0.0)


def plan(*triples: tuple[str, int, int]) -> tuple[Segment, ...]:
    return tuple(Segment(node=n, start=s, end=e) for n, s, e in triples)  # type: ignore[arg-type]


A = plan(("car", 0, 2), ("mec", 2, 6))
B = plan(("car", 0, 2), ("rsu", 2, 6))


def cand(segments: tuple[Segment, ...], latency_s: float, kind: str) -> CandidatePlan:
    return CandidatePlan(kind=kind, segments=segments, latency_s=latency_s, bottleneck_s=latency_s)  # type: ignore[arg-type]


def test_first_plan_arms_dwell_but_not_hysteresis() -> None:
    state = after_commit(OrchestratorState(), A, 1, 1000.0, initial=True)
    assert threshold(state, 1020.0, CONFIG) == 0.15
    candidates = (cand(A, 0.010, "current"), cand(B, 0.0075, "migrate"))  # saves 25 %
    held = decide(state, PERIODIC, candidates, 1010.0, CONFIG)
    assert held.action == "keep" and "dwell" in held.reason
    assert decide(state, PERIODIC, candidates, 1020.0, CONFIG).action == "migrate"


def test_a_replan_after_the_first_plan_doubles_the_threshold() -> None:
    first = after_commit(OrchestratorState(), A, 1, 1000.0, initial=True)
    state = after_commit(first, B, 2, 1020.0)
    assert threshold(state, 1040.0, CONFIG) == 0.30
    candidates = (cand(B, 0.010, "current"), cand(A, 0.0075, "migrate"))  # 25 %: below 30 %
    assert decide(state, PERIODIC, candidates, 1040.0, CONFIG).action == "keep"
    assert decide(state, PERIODIC, candidates, 1141.0, CONFIG).action == "migrate"
