"""The orchestrator's candidates under a precision policy (pure): new plans get int8 on a
slow hop and carry it, the running plan is priced at the precisions it runs with, and
the settings take the policy as JSON (activations only)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from services.orchestrator.__main__ import parse_args, settings_from
from services.orchestrator.candidates import build_candidates, serial_stage_s
from shared.errors import ConfigError
from shared.messages import Segment
from shared.planning.precision import PrecisionPolicy
from shared.planning.problem import parse_problem
from shared.planning.view import CostModel
from tests.unit.test_planner_precision import INT8, _chain

RSU_MEC = (Segment(node="rsu", start=0, end=4), Segment(node="mec", start=4, end=8))  # type: ignore[arg-type]
MEC_RSU = (Segment(node="rsu", start=0, end=5), Segment(node="mec", start=5, end=8))  # type: ignore[arg-type]


def _options():
    from shared.messages import PlanOption

    return [PlanOption(segments=MEC_RSU, latency_s=0.1, bottleneck_s=0.1, migration_cost_s=0.0,
                       weighted_cost_s=0.1)]  # fmt: skip


def test_new_candidates_carry_int8_on_the_slow_hop_and_the_running_plan_its_own() -> None:
    problem = parse_problem(_chain(INT8))
    running = build_candidates(problem, RSU_MEC, _options(), CostModel(1e6, 0), keep_migrations=0)
    current = next(c for c in running if c.kind == "current")
    other = next(c for c in running if c.kind != "current")
    assert current.link_precisions == ()  # it runs fp32 everywhere: priced so
    assert other.link_precisions == ((0, "int8"),)  # car -> rsu, the 20 kB/s link
    exact = build_candidates(problem.model_copy(update={"precision": None}), RSU_MEC, _options(),
                             CostModel(1e6, 0), keep_migrations=0)  # fmt: skip
    exact_other = next(c for c in exact if c.kind != "current")
    assert exact_other.link_precisions == ()
    saved = (2304 - 580) / 20e3
    assert exact_other.latency_s - other.latency_s == pytest.approx(saved, rel=1e-9)
    compressed = build_candidates(problem, RSU_MEC, (), CostModel(1e6, 0), keep_migrations=0,
                                  running_precisions=((0, "int8"),))  # fmt: skip
    assert compressed[0].latency_s == pytest.approx(current.latency_s - saved, rel=1e-9)
    assert serial_stage_s(problem, RSU_MEC, ((0, "int8"),)) == pytest.approx(580 / 20e3)


def test_settings_take_the_policy_as_json_and_refuse_weights() -> None:
    base = ["--shards", "/tmp/none"]
    assert settings_from(parse_args(base)).precision_policy == PrecisionPolicy.exact()
    given = settings_from(parse_args([*base, "--precision-policy", json.dumps(INT8)]))
    assert given.precision_policy == PrecisionPolicy(**INT8)
    for bad in ("{not json", json.dumps({"activations": ["int8"]}),
                json.dumps({"weights": ["int8"], "weight_loss": {"int8": 0.1}, "quality_budget": 0.2})):
        with pytest.raises(ConfigError, match="precision_policy"):
            settings_from(parse_args([*base, "--precision-policy", bad]))


def test_a_slow_hop_of_the_running_plan_is_recompressed_without_moving_a_block() -> None:
    from services.orchestrator.logic import (
        DecisionConfig,
        OrchestratorState,
        Trigger,
        allowed,
        decide,
    )

    problem = parse_problem(_chain(INT8))
    state = OrchestratorState(segments=RSU_MEC, epoch=3, changed_at_s=0.0)
    candidates = build_candidates(problem, RSU_MEC, (), CostModel(1e6, 0), keep_migrations=0)
    assert [(c.kind, c.segments, c.link_precisions) for c in candidates] == [
        ("current", RSU_MEC, ()), ("migrate", RSU_MEC, ((0, "int8"),))]
    assert candidates[1].migration_cost_s == 0.0  # no block moves
    decision = decide(state, Trigger("link_degraded", 1000.0), candidates, 1000.0, DecisionConfig())
    assert decision.action == "migrate" and decision.chosen is not None
    assert decision.chosen.segments == RSU_MEC and decision.chosen.link_precisions == ((0, "int8"),)
    assert allowed("static", RSU_MEC, candidates) == candidates[:1]  # static changes nothing
    running_int8 = build_candidates(problem, RSU_MEC, (), CostModel(1e6, 0), keep_migrations=0,
                                    running_precisions=((0, "int8"),))  # fmt: skip
    # already as the policy says: only the exact version is offered, and at 20 kB/s it is far slower
    assert [(c.kind, c.link_precisions) for c in running_int8] == [("current", ((0, "int8"),)), ("migrate", ())]
    stays = decide(state, Trigger("periodic", 1000.0), running_int8, 1000.0, DecisionConfig())
    assert stays.action == "keep"
    recovered = parse_problem(_chain(INT8, car_rsu_bps=12.5e6))
    back = build_candidates(recovered, RSU_MEC, (), CostModel(1e6, 0), keep_migrations=0,
                            running_precisions=((0, "int8"),))  # fmt: skip
    assert back[1].link_precisions == ()  # the link recovered: the policy would send it exact
    assert back[1].latency_s > back[0].latency_s  # exact is 0.1 ms per token slower ...
    exact = decide(state, Trigger("link_recovered", 1000.0), back, 1000.0, DecisionConfig())
    assert exact.action == "migrate" and exact.chosen is not None  # ... and answers lose nothing
    assert exact.chosen.segments == RSU_MEC and exact.chosen.link_precisions == ()
    assert "back to more exact hops" in exact.reason
    dwell = decide(replace(state, changed_at_s=995.0), Trigger("link_recovered", 1000.0), back, 1000.0,
                   DecisionConfig())  # fmt: skip
    assert dwell.action == "keep" and "dwell" in dwell.reason  # not sooner than a change may


def _decide_on(car_rsu_bps: float, running: tuple[tuple[int, str], ...]):
    from services.orchestrator.logic import DecisionConfig, OrchestratorState, Trigger, decide

    problem = parse_problem(_chain(INT8, car_rsu_bps=car_rsu_bps))
    candidates = build_candidates(problem, RSU_MEC, (), CostModel(1e6, 0), keep_migrations=0,
                                  running_precisions=running)  # fmt: skip
    state = OrchestratorState(segments=RSU_MEC, epoch=3, changed_at_s=0.0)
    return candidates, decide(state, Trigger("periodic", 1000.0), candidates, 1000.0, DecisionConfig())


def test_an_int8_hop_goes_back_to_exact_only_when_exact_costs_under_the_threshold() -> None:
    # 200 kB/s: int8 saves 8.6 ms of about 26: exact is offered, but costs far over 15 %
    candidates, slow = _decide_on(200e3, ((0, "int8"),))
    assert [c.link_precisions for c in candidates] == [((0, "int8"),), ()]
    assert slow.action == "keep" and "at or over the 15% threshold" in slow.reason
    # 1 MB/s: the policy still gives int8 (it saves 1.7 ms >= its 1 ms minimum), yet exact
    # costs about 12 % of the compressed plan's time: back to exact ...
    candidates, mid = _decide_on(1e6, ((0, "int8"),))
    assert [c.link_precisions for c in candidates] == [((0, "int8"),), ()]
    assert mid.action == "migrate" and mid.chosen is not None and mid.chosen.link_precisions == ()
    # ... and, running exact there, compressing again does not save the 15 % it needs: no flap
    _, again = _decide_on(1e6, ())
    assert again.action == "keep" and "below the 15% threshold" in again.reason


@pytest.mark.parametrize(("current", "candidate", "expected"), [
    (((0, "int8"),), (), True),
    (((0, "int8"),), ((0, "fp16"),), True),
    (((0, "fp16"),), ((0, "int8"),), False),
    (((0, "int8"), (4, "int8")), ((4, "int8"),), True),
    (((0, "int8"),), ((4, "fp16"),), False),  # one hop more exact, another lossier
    ((), (), False),
    (((0, "int8"),), ((0, "int8"),), False),
])  # fmt: skip
def test_more_exact_compares_every_hop(current, candidate, expected) -> None:
    from services.orchestrator.logic import more_exact

    assert more_exact(current, candidate) is expected
