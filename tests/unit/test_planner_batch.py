"""The planner's batched decode cost (docs/PLANNER.md, "Batched decode"): each node's
compute priced as one request's share of a batch of ``expected_batch`` steps,
(1 + s (B - 1)) / B x one step, s the node's measured ``batch_scaling``."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from shared.errors import ProblemFieldError
from shared.planning.objectives import build_tables, objective_terms
from shared.planning.problem import Placement, evaluate, parse_problem
from shared.planning.solver import solve
from tests.unit.planner_instances import brute_force, random_problem

EXAMPLES = Path("/work/shared/design/examples")
HERE = Path(__file__).resolve().parents[2]


def _examples() -> list[dict]:
    """The contract's worked examples (a copy kept with the tests when the handout is absent)."""
    found = sorted(EXAMPLES.glob("problem-*.json")) if EXAMPLES.is_dir() else []
    return [json.loads(path.read_text()) for path in found] or [two_nodes()]


def two_nodes(batch: float | None = None, fast_scaling: float | None = None,
              slow_scaling: float | None = None, objective: str = "latency") -> dict:  # fmt: skip
    """An entry that hosts nothing, a fast node and a node half as fast; equal links.
    Unbatched the fast node takes every block; at a batch of 8 with poor scaling on the
    fast node (1.0: no gain) and good scaling on the slow one (0.1) the slow one pays."""
    data: dict = {
        "objective": objective, "source": "entry", "input_bytes": 2304,
        "layers": [{"flops": 1e8, "weight_bytes": 1e6, "out_bytes": 2304} for _ in range(4)],
        "nodes": [
            {"id": "entry", "trust": 2, "memory_bytes": 0.0, "flops_per_s": 1e9, "utilization": 1.0},
            {"id": "fast", "trust": 2, "memory_bytes": 1e8, "flops_per_s": 2e9},
            {"id": "slow", "trust": 2, "memory_bytes": 1e8, "flops_per_s": 1e9},
        ],
        "links": [{"src": a, "dst": b, "bandwidth_bytes_per_s": 1e7, "latency_s": 0.001}
                  for a in ("entry", "fast", "slow") for b in ("entry", "fast", "slow") if a != b],
    }  # fmt: skip
    if batch is not None:
        data["expected_batch"] = batch
    for name, scaling in (("fast", fast_scaling), ("slow", slow_scaling)):
        if scaling is not None:
            next(n for n in data["nodes"] if n["id"] == name)["batch_scaling"] = scaling
    return data


def test_compute_is_one_requests_share_of_the_batched_step() -> None:
    problem = parse_problem(two_nodes(batch=8, slow_scaling=0.5))
    placement = Placement.of(("slow", 0, 4))
    evaluation = evaluate(problem, placement)
    compute = 4e8 / 1e9 * (1 + 0.5 * 7) / 8  # 0.4 s alone, 0.225 s as a share of 8
    hop = 0.001 + 2304 / 1e7
    assert compute == pytest.approx(0.225)
    assert evaluation.latency_s == pytest.approx(compute + 2 * hop, rel=1e-12)
    assert evaluation.bottleneck_s == pytest.approx(compute, rel=1e-12)
    # scaling 1 (no gain) is a lone step again; scaling 0 (free rows) is 1/B of it
    for scaling, share in ((1.0, 0.4), (0.0, 0.05)):
        alone = parse_problem(two_nodes(batch=8, slow_scaling=scaling))
        assert evaluate(alone, placement).bottleneck_s == pytest.approx(share, rel=1e-12)
    # the tables the solvers search hold the same numbers
    tables = build_tables(problem)
    assert tables.compute[tables.node_ids.index("slow"), 0, 4] == pytest.approx(compute, rel=1e-12)
    assert tables.compute[tables.node_ids.index("fast"), 0, 4] == 4e8 / 2e9  # not measured: unscaled


def test_a_plan_for_eight_requests_differs_from_the_plan_for_one() -> None:
    one = solve(parse_problem(two_nodes(1, 1.0, 0.1)))
    eight = solve(parse_problem(two_nodes(8, 1.0, 0.1)))
    assert [(s.node, s.start, s.end) for s in one.segments] == [("fast", 0, 4)]
    assert [(s.node, s.start, s.end) for s in eight.segments] == [("slow", 0, 4)]
    # slow's share: 0.4 s x (1 + 0.1 x 7) / 8 = 0.085 s; fast's stays 0.2 s (no gain)
    assert eight.predicted is not None and eight.predicted.bottleneck_s == pytest.approx(0.085)
    # throughput splits the blocks; per block fast takes 0.05 s, slow 0.1 s alone and
    # 0.02125 s as a share of 8: 1 + 3 blocks (0.15 s) for one request, 3 + 1 (0.06375 s) for 8
    one = solve(parse_problem(two_nodes(1, 1.0, 0.1, "throughput")))
    eight = solve(parse_problem(two_nodes(8, 1.0, 0.1, "throughput")))
    blocks = [{s.node: s.end - s.start for s in r.segments} for r in (one, eight)]
    assert blocks == [{"slow": 1, "fast": 3}, {"slow": 3, "fast": 1}]
    assert one.predicted is not None and one.predicted.bottleneck_s == pytest.approx(0.15)
    assert eight.predicted is not None and eight.predicted.bottleneck_s == pytest.approx(0.06375)


@pytest.mark.parametrize("fields", [
    {"expected_batch": 1},
    {"expected_batch": 1.0, "batch_scaling": 0.3},
    {"expected_batch": 8},  # no node measured: no gain assumed, the contract's numbers
])  # fmt: skip
def test_without_a_batch_or_a_scaling_the_answer_is_the_contracts_exactly(fields: dict) -> None:
    rng = random.Random(4)
    problems = _examples() + [random_problem(rng) for _ in range(60)]
    for data in problems:
        changed = {**data, "expected_batch": fields["expected_batch"]}
        if "batch_scaling" in fields:
            changed["nodes"] = [{**node, "batch_scaling": fields["batch_scaling"]} for node in data["nodes"]]
        for objective in ("latency", "throughput"):
            old = solve(parse_problem({**data, "objective": objective}))
            new = solve(parse_problem({**changed, "objective": objective}))
            assert old.to_json() == new.to_json()  # plan and numbers, bit for bit
            if old.feasible:
                placement = old.placement
                assert evaluate(parse_problem(data), placement) == evaluate(parse_problem(changed), placement)
                assert objective_terms(parse_problem(data), placement) == objective_terms(parse_problem(changed), placement)


def test_batched_answers_match_the_brute_force_optimum() -> None:
    rng = random.Random(21)
    for _ in range(150):
        data = random_problem(rng)
        data["expected_batch"] = rng.choice((2, 4, 8, 3.5))
        for node in data["nodes"]:
            if rng.random() < 0.7:
                node["batch_scaling"] = rng.choice((0.0, 0.1, 0.35, 1.0, 1.4))
        truth = brute_force(data)
        for objective in ("latency", "throughput"):
            result = solve(parse_problem({**data, "objective": objective}), method="exact")
            assert result.feasible == (truth.best_latency is not None), data
            if not result.feasible:
                continue
            assert result.predicted is not None and truth.best_throughput is not None
            assert truth.best_latency is not None
            got = (result.predicted.latency_s,) if objective == "latency" else (
                result.predicted.bottleneck_s, result.predicted.latency_s)
            want = (truth.best_latency,) if objective == "latency" else truth.best_throughput
            for have, best in zip(got, want, strict=True):
                assert math.isclose(have, best, rel_tol=1e-9), (objective, got, want, data)


def test_a_bad_batch_names_the_field() -> None:
    for value, words in ((0.5, "expected_batch: must be a number >= 1"), ("8", "expected_batch")):
        with pytest.raises(ProblemFieldError, match=words):
            parse_problem({**two_nodes(), "expected_batch": value})
    data = two_nodes(batch=8)
    data["nodes"][1]["batch_scaling"] = -0.1
    with pytest.raises(ProblemFieldError, match=r"nodes\[1\]\.batch_scaling: must be a number >= 0"):
        parse_problem(data)
