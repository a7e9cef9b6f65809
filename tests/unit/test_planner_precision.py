"""The planner's precision choices (shared/planning/precision*.py): activation precision
per link, weight precision per segment, under a policy with a quality budget."""

from __future__ import annotations

import json
import math
import random

import pytest

from shared.errors import ProblemFieldError
from shared.planning.precision import PrecisionPolicy, activation_bytes
from shared.planning.problem import PlacedSegment, Placement, evaluate, parse_problem
from shared.planning.solver import solve
from tests.unit.planner_instances import random_problem

HIDDEN_BYTES = 2304.0  # SmolLM2: 576 fp32 values per token
INT8 = {"activations": ["fp32", "fp16", "int8"], "activation_loss": {"fp16": 0.001, "int8": 0.01},
        "quality_budget": 0.05}  # fmt: skip


def _chain(precision: dict | None = None, car_rsu_bps: float = 20e3, rsu_mec_bps: float = 12.5e6) -> dict:
    """car (source, holds nothing) -> rsu [0, k) -> mec [k, 8) -> car: the only route,
    since each worker holds at most 5 of the 8 blocks and car reaches mec only back."""
    fast = 12.5e6
    problem = {
        "source": "car", "input_bytes": HIDDEN_BYTES,
        "layers": [{"flops": 1e7, "weight_bytes": 1e6, "out_bytes": HIDDEN_BYTES}] * 8,
        "nodes": [{"id": "car", "trust": 2, "memory_bytes": 0.0, "flops_per_s": 1e9},
                  {"id": "rsu", "trust": 1, "memory_bytes": 5e6, "flops_per_s": 1e10},
                  {"id": "mec", "trust": 1, "memory_bytes": 5e6, "flops_per_s": 1e10}],
        "links": [{"src": "car", "dst": "rsu", "bandwidth_bytes_per_s": car_rsu_bps, "latency_s": 0.002},
                  {"src": "rsu", "dst": "mec", "bandwidth_bytes_per_s": rsu_mec_bps, "latency_s": 0.002},
                  {"src": "mec", "dst": "car", "bandwidth_bytes_per_s": fast, "latency_s": 0.002},
                  {"src": "rsu", "dst": "car", "bandwidth_bytes_per_s": fast, "latency_s": 0.002}],
    }  # fmt: skip
    if precision is not None:
        problem["precision"] = precision
    return problem


def _hop_precisions(result) -> list[str]:
    return [seg.activations for seg in result.segments] + [result.return_activations]


def test_bytes_per_element() -> None:
    assert activation_bytes(HIDDEN_BYTES, "fp32") == 2304
    assert activation_bytes(HIDDEN_BYTES, "fp16") == 1152
    assert activation_bytes(HIDDEN_BYTES, "int8") == 576 + 4  # one float32 scale per row


@pytest.mark.parametrize("precision", [None, {}, {"activations": ["fp32"], "weights": ["fp32"]},
                                       {**INT8, "quality_budget": 0.0}])  # fmt: skip
def test_exact_policy_never_picks_a_lossy_precision(precision: dict | None) -> None:
    result = solve(parse_problem(_chain(precision)))
    assert result.feasible
    assert _hop_precisions(result) == ["fp32"] * (len(result.segments) + 1)
    assert {seg.weights for seg in result.segments} == {"fp32"}
    plain = solve(parse_problem(_chain()))
    assert result.predicted == plain.predicted


def test_exact_policy_on_random_instances_changes_nothing() -> None:
    rng = random.Random(22)
    for _ in range(150):
        data = random_problem(rng)
        plain = solve(parse_problem(data))
        exact = solve(parse_problem({**data, "precision": {"activations": ["fp32", "int8"],
                                                          "activation_loss": {"int8": 0.5},
                                                          "weights": ["int8"], "weight_loss": {"int8": 0.5},
                                                          "quality_budget": 0.1}}))  # fmt: skip
        assert exact.feasible == plain.feasible
        if plain.feasible:
            assert exact.predicted == plain.predicted
            assert set(_hop_precisions(exact)) == {"fp32"} and {s.weights for s in exact.segments} == {"fp32"}


def test_a_20_kb_per_s_link_gets_int8_and_only_that_link() -> None:
    exact = solve(parse_problem(_chain()))
    result = solve(parse_problem(_chain(INT8)))
    assert [seg.node for seg in result.segments] == ["rsu", "mec"]
    assert _hop_precisions(result) == ["int8", "fp32", "fp32"]  # car->rsu, rsu->mec, mec->car
    saved = (HIDDEN_BYTES - (HIDDEN_BYTES / 4 + 4)) / 20e3
    assert math.isclose(exact.predicted.latency_s - result.predicted.latency_s, saved, rel_tol=1e-9)
    summary = result.to_json()["precision"]
    slow = summary["hops"][0]
    assert (slow["src"], slow["dst"], slow["activations"], slow["bytes_per_token"]) == ("car", "rsu", "int8", 580)
    assert math.isclose(summary["link_saved_s"], saved, rel_tol=1e-9)
    assert summary["quality_loss"] == pytest.approx(0.01)
    assert "precision" not in exact.to_json()  # fp32-only answers keep the contract's shape


def test_fp16_when_int8_is_not_allowed_and_fp32_when_the_link_is_fast() -> None:
    fp16 = {"activations": ["fp16"], "activation_loss": {"fp16": 0.001}, "quality_budget": 0.01}
    assert _hop_precisions(solve(parse_problem(_chain(fp16))))[0] == "fp16"
    fast = solve(parse_problem(_chain(INT8, car_rsu_bps=12.5e6)))
    assert set(_hop_precisions(fast)) == {"fp32"}  # saving 0.14 ms < min_saving_s


def test_the_quality_budget_rations_lossy_hops_by_saving() -> None:
    both_slow = {"car_rsu_bps": 20e3, "rsu_mec_bps": 40e3}
    one = solve(parse_problem(_chain({**INT8, "quality_budget": 0.01}, **both_slow)))
    assert _hop_precisions(one) == ["int8", "fp32", "fp32"]  # the slower link saves more
    two = solve(parse_problem(_chain({**INT8, "quality_budget": 0.02}, **both_slow)))
    assert _hop_precisions(two) == ["int8", "int8", "fp32"]
    partial = solve(parse_problem(_chain({**INT8, "quality_budget": 0.011}, **both_slow)))
    assert _hop_precisions(partial) == ["int8", "fp16", "fp32"]  # what is left buys fp16
    assert two.predicted.latency_s < partial.predicted.latency_s < one.predicted.latency_s
    all_slow = _chain({**INT8, "quality_budget": 0.03}, **both_slow)
    all_slow["links"][2]["bandwidth_bytes_per_s"] = 30e3  # mec -> car too
    three = solve(parse_problem(all_slow))  # 3 x 0.01 fills the budget exactly: no InvalidPlan
    assert _hop_precisions(three) == ["int8", "int8", "int8"]


def _one_node(memory_bytes: float, precision: dict | None) -> dict:
    problem = _chain(precision)
    problem["nodes"] = [{"id": "car", "trust": 2, "memory_bytes": 0.0, "flops_per_s": 1e9},
                        {"id": "rsu", "trust": 1, "memory_bytes": memory_bytes, "flops_per_s": 1e10}]  # fmt: skip
    problem["links"] = [link for link in problem["links"] if "mec" not in (link["src"], link["dst"])]
    return problem


def test_memory_admits_more_blocks_at_int8() -> None:
    int8_weights = {"weights": ["int8"], "weight_loss": {"int8": 0.1}, "quality_budget": 0.1}
    # 8 blocks of 1 MB fp32: 8 MB at fp32, 3.2 MB held at int8 (0.4 bytes per fp32 byte).
    assert not solve(parse_problem(_one_node(4e6, None))).feasible
    result = solve(parse_problem(_one_node(4e6, int8_weights)))
    assert result.feasible and [(s.node, s.weights) for s in result.segments] == [("rsu", "int8")]
    summary = result.to_json()["precision"]
    assert summary["memory_saved_bytes"] == pytest.approx(8e6 * 0.6)
    roomy = solve(parse_problem(_one_node(9e6, int8_weights)))
    assert [s.weights for s in roomy.segments] == ["fp32"]  # lossy weights only buy memory
    over_budget = {**int8_weights, "quality_budget": 0.05}
    assert not solve(parse_problem(_one_node(4e6, over_budget))).feasible


def test_evaluate_reports_precisions_the_policy_does_not_allow() -> None:
    problem = parse_problem(_chain({**INT8, "quality_budget": 0.015}))
    lossy = Placement(segments=(PlacedSegment(node="rsu", start=0, end=4, activations="int8"),
                                PlacedSegment(node="mec", start=4, end=8, activations="int8")))  # fmt: skip
    assert any("over the budget" in v for v in evaluate(problem, lossy).violations)
    exact = parse_problem(_chain())
    held = Placement(segments=(PlacedSegment(node="rsu", start=0, end=4, weights="int8"),
                               PlacedSegment(node="mec", start=4, end=8)))  # fmt: skip
    assert any("holds int8 weights" in v for v in evaluate(exact, held).violations)
    assert any("carries int8 activations" in v for v in evaluate(exact, lossy).violations)


@pytest.mark.parametrize(("precision", "field"), [
    ({"activations": ["int8"]}, "precision: activation_loss: no loss given"),
    ({"activations": ["int2"]}, "precision.activations[0]"),
    ({"quality_budget": 2}, "precision.quality_budget"),
])  # fmt: skip
def test_bad_policies_are_named(precision: dict, field: str) -> None:
    with pytest.raises(ProblemFieldError) as error:
        parse_problem(_chain(precision))
    assert str(error.value).startswith(field)


def test_policy_round_trips_through_json() -> None:
    problem = parse_problem(_chain(INT8))
    again = parse_problem(json.loads(json.dumps(problem.model_dump(mode="json", exclude_none=True))))
    assert again == problem and again.policy == PrecisionPolicy(**INT8)


def test_plan_command_shows_the_choices_and_savings(tmp_path) -> None:
    from tests.unit.test_planner import _cli

    path = tmp_path / "problem.json"
    path.write_text(json.dumps(_chain(INT8)))
    table = _cli(str(path))
    assert table.returncode == 0, table.stderr
    assert "link car -> rsu (before layer 0): int8, 580 of 2304 bytes per token, 0.0862 s per token saved" in table.stdout
    assert "quality loss 0.01 of budget 0.05" in table.stdout
    answer = json.loads(_cli(str(path), "--json").stdout)
    assert answer["segments"][0]["activations"] == "int8" and "activations" not in answer["segments"][1]
    assert answer["precision"]["link_saved_s"] == pytest.approx(0.0862)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_chain({"activations": ["int8"]})))
    refused = _cli(str(bad))
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "activation_loss" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("budget", [1.0, 0.015])
def test_random_instances_with_a_lossy_policy_stay_valid_and_never_slower(budget: float) -> None:
    """Every answer passes the evaluator (precisions allowed, loss within the budget,
    memory at the chosen weights); with a budget that covers every hop, compression
    never makes the optimum slower than the exact one."""
    policy = {"activations": ["fp32", "fp16", "int8"], "activation_loss": {"fp16": 0.001, "int8": 0.01},
              "weights": ["fp32", "bf16", "int8"], "weight_loss": {"bf16": 0.001, "int8": 0.005},
              "quality_budget": budget, "min_saving_s": 0.0}  # fmt: skip
    rng = random.Random(7)
    for _ in range(120):
        data = random_problem(rng)
        exact = solve(parse_problem(data), method="exact")
        problem = parse_problem({**data, "precision": policy})
        result = solve(problem, method="exact")
        assert result.feasible or not exact.feasible
        if not result.feasible:
            continue
        assert evaluate(problem, result.placement).violations == ()
        if exact.feasible and budget == 1.0:
            key = "latency_s" if problem.objective == "latency" else "bottleneck_s"
            assert getattr(result.predicted, key) <= getattr(exact.predicted, key) * (1 + 1e-9)
