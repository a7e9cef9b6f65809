"""The planner against an independent brute force on thousands of small instances."""

from __future__ import annotations

import math
import random

import pytest

from shared.planning.problem import evaluate, parse_problem
from shared.planning.solver import solve
from tests.unit.planner_instances import brute_force, random_problem

REL = 1e-9


def _check(data: dict, method: str) -> None:
    truth = brute_force(data)
    for objective in ("latency", "throughput"):
        problem = parse_problem({**data, "objective": objective})
        result = solve(problem, method=method)
        if truth.best_latency is None:
            assert not result.feasible, (objective, data)
            assert result.reason
            continue
        assert result.feasible, (objective, result.reason, data)
        evaluation = evaluate(problem, result.placement)
        assert evaluation.violations == (), evaluation.violations
        assert math.isclose(result.predicted.latency_s, evaluation.latency_s, rel_tol=REL)
        if objective == "latency":
            expected = (truth.best_latency,)
            got = (evaluation.latency_s,)
        else:
            expected = truth.best_throughput
            got = (evaluation.bottleneck_s, evaluation.latency_s)
        if method == "exact" or result.optimal:
            for have, want in zip(got, expected, strict=True):
                assert math.isclose(have, want, rel_tol=REL), (objective, got, expected, data)
        else:  # a heuristic answer is never better than the optimum
            assert got >= tuple(w * (1 - REL) for w in expected)


@pytest.mark.parametrize("seed", range(4))
def test_exact_matches_brute_force(seed: int) -> None:
    rng = random.Random(1000 + seed)
    for _ in range(400):
        _check(random_problem(rng), "exact")


def test_largest_enumerable_instances() -> None:
    rng = random.Random(77)
    for _ in range(40):
        data = random_problem(rng, max_nodes=6, max_layers=10)
        while len(data["nodes"]) < 5:
            data = random_problem(rng, max_nodes=6, max_layers=10)
        _check(data, "exact")


def test_fast_method_is_valid_and_optimal_when_it_says_so() -> None:
    rng = random.Random(5)
    for _ in range(300):
        _check(random_problem(rng), "fast")


def test_auto_method_matches_brute_force() -> None:
    rng = random.Random(9)
    for _ in range(200):
        _check(random_problem(rng), "auto")
