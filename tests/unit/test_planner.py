"""Planner unit tests: worked examples, validation, determinism, policy, weights, CLI."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import ProblemFieldError
from shared.messages import PrivacyPolicy
from shared.planning.objectives import ObjectiveWeights, objective_terms
from shared.planning.privacy import apply_policy
from shared.planning.problem import Placement, evaluate, load_problem, parse_problem
from shared.planning.solver import solve
from tests.unit.planner_instances import random_problem

EXAMPLES = Path(__file__).resolve().parent.parent / "data" / "planner"  # copies of ../shared/design/examples
ROOT = Path(__file__).resolve().parents[2]


def _example(objective: str) -> dict:
    return json.loads((EXAMPLES / f"problem-{objective}.json").read_text())


@pytest.mark.parametrize("objective", ["latency", "throughput"])
@pytest.mark.parametrize("method", ["exact", "fast", "auto"])
def test_worked_examples(objective: str, method: str) -> None:
    problem = parse_problem(_example(objective))
    want = json.loads((EXAMPLES / f"plan-{objective}.json").read_text())
    got = solve(problem, method=method).to_json()
    assert got["feasible"] is True
    for key in ("latency_s", "bottleneck_s"):
        assert math.isclose(got["predicted"][key], want["predicted"][key], rel_tol=1e-9)
    assert set(got) == {"feasible", "segments", "predicted"}


def test_examples_differ_and_throughput_uses_mec() -> None:
    latency = solve(parse_problem(_example("latency")))
    throughput = solve(parse_problem(_example("throughput")))
    assert "mec" not in [s.node for s in latency.segments]
    assert throughput.segments[-1].node == "mec"


def test_same_problem_same_plan_whatever_the_node_order() -> None:
    rng = random.Random(3)
    checked = 0
    while checked < 30:
        data = random_problem(rng)
        first = solve(parse_problem(data))
        if not first.feasible:
            continue
        shuffled = {**data, "nodes": list(reversed(data["nodes"])),
                    "links": list(reversed(data["links"]))}
        assert solve(parse_problem(data)) == first
        assert solve(parse_problem(shuffled)).segments == first.segments
        checked += 1


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["layers"][3].update(flops=-1), "layers[3].flops: must be a number >= 0"),
    (lambda d: d["layers"][1].update(flops="7"), "layers[1].flops: must be a number"),
    (lambda d: d.update(source="x"), "source: 'x' is not a node id"),
    (lambda d: d["links"][2].update(dst="nowhere"), "links[2].dst: unknown node 'nowhere'"),
    (lambda d: d["nodes"][1].update(trust=1.5), "nodes[1].trust: must be an integer"),
    (lambda d: d["nodes"][2].update(id="car"), "nodes[2].id: duplicate node id 'car'"),
    (lambda d: d["nodes"][0].pop("memory_bytes"), "nodes[0].memory_bytes: missing"),
    (lambda d: d.update(objective="speed"), "objective: must be one of"),
    (lambda d: d.update(layers=[]), "layers: must not be empty"),
    (lambda d: d["links"][0].update(bandwidth_bytes_per_s=0), "links[0].bandwidth_bytes_per_s"),
    (lambda d: d.update(extra=1), "extra: unknown field"),
])
def test_malformed_fields_are_named(change, message: str) -> None:
    data = _example("latency")
    change(data)
    with pytest.raises(ProblemFieldError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_problem(data)


def test_load_problem_errors(tmp_path: Path) -> None:
    with pytest.raises(ProblemFieldError, match="not found"):
        load_problem(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProblemFieldError, match="not valid JSON"):
        load_problem(bad)


def test_evaluator_lists_violations() -> None:
    problem = parse_problem(_example("latency"))
    evaluation = evaluate(problem, Placement.of(("mec", 0, 3), ("mec", 3, 3), ("rsu", 4, 7)))
    text = " | ".join(evaluation.violations)
    for part in ("trust: layer 0", "more than one segment", "is empty", "starts at 4",
                 "ends at layer 7"):
        assert part in text
    assert not evaluate(problem, Placement.of(("car", 0, 1), ("rsu", 1, 8))).violations


def test_infeasible_reasons_name_the_constraint() -> None:
    data = _example("latency")
    data["nodes"][0]["memory_bytes"] = 10.0
    result = solve(parse_problem(data))
    assert not result.feasible
    assert result.reason.startswith("no node with trust >= 2 has memory for layer 0")
    assert result.to_json() == {"feasible": False, "reason": result.reason}
    data = _example("latency")
    data["links"] = [link for link in data["links"] if link["dst"] != "car"]
    assert "back to source 'car'" in solve(parse_problem(data)).reason


def test_privacy_policy_is_never_broken() -> None:
    problem = parse_problem(_example("throughput"))
    policy = PrivacyPolicy(trusted_level=1, private_blocks=3)
    guarded = apply_policy(problem, policy)
    assert [layer.min_trust for layer in guarded.layers[:4]] == [2, 1, 1, 0]
    result = solve(guarded)
    trust = {node.id: node.trust for node in problem.nodes}
    for seg in result.segments:
        if seg.start < 3:
            assert trust[seg.node] >= 1
    strict = apply_policy(problem, PrivacyPolicy(trusted_level=2, private_blocks=4))
    reason = solve(strict).reason
    assert reason.startswith("layers 0-3 need trust >= 2"), reason
    untrusted_source = apply_policy(problem, PrivacyPolicy(trusted_level=3))
    assert "embedding and head" in solve(untrusted_source).reason


def test_zero_weights_leave_the_answer_unchanged() -> None:
    rng = random.Random(11)
    for _ in range(60):
        data = random_problem(rng)
        problem = parse_problem(data)
        base = solve(problem)
        current = base.placement if base.feasible else None
        weighted = solve(problem, weights=ObjectiveWeights(), current_placement=current)
        assert weighted == base


def test_weights_change_the_plan_as_documented() -> None:
    data = _example("latency")
    data["layers"][1]["preferred_trust"] = 2
    for layer in data["layers"][2:]:
        layer["preferred_trust"] = 1
    problem = parse_problem(data)
    plain = solve(problem)
    weighted = solve(problem, weights=ObjectiveWeights(privacy_s=1.0))
    assert weighted.placement != plain.placement or plain.segments[0].end > 1
    terms = objective_terms(problem, weighted.placement, ObjectiveWeights(privacy_s=1.0))
    assert terms.privacy_levels < objective_terms(problem, Placement.of(("car", 0, 1), ("mec", 1, 8))).privacy_levels
    current = Placement.of(("car", 0, 1), ("rsu", 1, 2), ("mec", 2, 8))
    sticky = solve(problem, weights=ObjectiveWeights(migration=1.0), current_placement=current)
    assert sticky.placement == current  # moving 7 MB of weights and KV outweighs 3 ms
    assert objective_terms(problem, current, current_placement=current).migration_s == 0


def test_alternatives_are_distinct_and_sorted() -> None:
    for objective in ("latency", "throughput"):
        problem = parse_problem(_example(objective))
        result = solve(problem, alternatives=5)
        plans = [result] + list(result.alternatives)
        assert len(plans) == 6
        assert len({p.segments for p in plans}) == 6
        if objective == "latency":
            keys = [(p.predicted.latency_s,) for p in plans]
        else:
            keys = [(p.predicted.bottleneck_s, p.predicted.latency_s) for p in plans]
        assert keys == sorted(keys, key=lambda k: tuple(round(x, 12) for x in k))
        for plan in plans:
            assert not evaluate(problem, plan.placement).violations


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "plan", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cli_exit_codes(tmp_path: Path) -> None:
    example = EXAMPLES / "problem-latency.json"
    _example("latency")
    done = _cli(str(example), "--json", "--objective", "throughput")
    assert done.returncode == 0
    assert json.loads(done.stdout)["predicted"]["bottleneck_s"] == pytest.approx(0.02152)
    table = _cli(str(example))
    assert table.returncode == 0 and "latency_s 0.053608" in table.stdout
    data = _example("latency")
    data["nodes"][0]["memory_bytes"] = 0.0
    infeasible = tmp_path / "infeasible.json"
    infeasible.write_text(json.dumps(data))
    done = _cli(str(infeasible), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["feasible"] is False
    bad = tmp_path / "bad.json"
    bad.write_text('{"objective": "latency"}')
    for path in (bad, tmp_path / "missing.json"):
        done = _cli(str(path), "--json")
        assert done.returncode == 1
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "source: missing" in _cli(str(bad)).stderr
    assert _cli(str(example), "--method", "nope").returncode == 2
