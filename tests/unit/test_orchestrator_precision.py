"""The orchestrator's candidates under a precision policy (pure): new plans get int8 on a
slow hop and carry it, the running plan is priced at the precisions it runs with, and
the settings take the policy as JSON (activations only)."""

from __future__ import annotations

import json

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
    assert [c.kind for c in running_int8] == ["current"]  # already as the policy says: nothing to do
    recovered = parse_problem(_chain(INT8, car_rsu_bps=12.5e6))
    back = build_candidates(recovered, RSU_MEC, (), CostModel(1e6, 0), keep_migrations=0,
                            running_precisions=((0, "int8"),))  # fmt: skip
    assert back[1].link_precisions == ()  # the link recovered: the policy would send it exact
    keep = decide(state, Trigger("link_recovered", 1000.0), back, 1000.0, DecisionConfig())
    assert keep.action == "keep"  # but exact is 0.1 ms per token slower: int8 stays (open, see docs)
