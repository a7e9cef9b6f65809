"""``solve(problem) -> PlanResult``: the split reviser's planner.

Chooses node subset, order and split points together (docs/PLANNER.md). Exact subset
DP where the instance allows (``solver_exact``), the candidate-restricted DP with a
relaxation bound beyond (``solver_fast``); ``alternatives=k`` adds the next k best
distinct plans (Lawler's partition of the plan space).
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from shared.errors import InvalidPlan, PlanError
from shared.planning.diagnose import explain
from shared.planning.objectives import CostTables, ObjectiveWeights, build_tables
from shared.planning.precision import ActivationPrecision
from shared.planning.precision_plan import assign_precisions, precision_summary
from shared.planning.problem import (
    Objective,
    PlacedSegment,
    Placement,
    Predicted,
    Problem,
    evaluate,
)
from shared.planning.solver_exact import (
    Path,
    Start,
    exact_work,
    solve_exact,
)
from shared.planning.solver_fast import candidate_order, solve_fast

Method = Literal["auto", "exact", "fast"]

MAX_EXACT_NODES = 14  # memory: (L+1) x n x 2^n floats
EXACT_WORK_PER_S = 4e8  # measured order of magnitude (bench/planner.py)
FAST_CANDIDATES = 9
FAST_MAX_CANDIDATES = 11


class PlanResult(BaseModel):
    """A planning answer. ``to_json()`` is the contract's shape (cost-model.md)."""

    model_config = ConfigDict(frozen=True)
    feasible: bool
    segments: tuple[PlacedSegment, ...] = ()
    predicted: Predicted | None = None
    reason: str | None = None
    objective: Objective = "latency"
    method: Literal["exact", "fast"] = "exact"
    optimal: bool = False  # proven optimal (exact, or the relaxation certified it)
    weighted_cost: float | None = None  # latency + weighted extra terms (s)
    lower_bound: float | None = None  # on the primary objective (s), fast method only
    alternatives: tuple[PlanResult, ...] = ()
    return_activations: ActivationPrecision = "fp32"
    precision: dict[str, Any] | None = None  # precision_summary, when the problem has a policy

    @property
    def placement(self) -> Placement:
        """The answer's segments as a `Placement` (for ``evaluate`` and the objectives)."""
        return Placement(segments=self.segments, return_activations=self.return_activations)

    def to_json(self) -> dict[str, Any]:
        """``{"feasible": true, "segments": [...], "predicted": {...}}`` or the reason."""
        if not self.feasible:
            return {"feasible": False, "reason": self.reason}
        assert self.predicted is not None
        answer = {
            "feasible": True,
            "segments": [seg.model_dump(exclude_defaults=True) for seg in self.segments],
            "predicted": self.predicted.model_dump(),
        }
        if self.precision is not None:  # only for a problem with a precision policy
            answer["precision"] = self.precision
        return answer


def usable_nodes(tables: CostTables) -> list[int]:
    """Nodes that can host a layer and sit on a link cycle through the source."""
    hosts = set(np.flatnonzero(np.isfinite(tables.compute).any(axis=(1, 2))).tolist())
    graph = np.isfinite(tables.hop[:, :, 0])
    allowed = hosts | {tables.source}

    def reach(matrix: np.ndarray) -> set[int]:
        seen, todo = {tables.source}, [tables.source]
        while todo:
            for nxt in np.flatnonzero(matrix[todo.pop()]).tolist():
                if nxt in allowed and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    return sorted((reach(graph) & reach(graph.T) & hosts) | {tables.source})


def _choose_method(
    method: Method, num_nodes: int, num_layers: int, time_limit_s: float
) -> Literal["exact", "fast"]:
    if method == "exact":
        if num_nodes > MAX_EXACT_NODES:
            raise PlanError(
                f"method exact: {num_nodes} usable nodes is more than the exact search's "
                f"{MAX_EXACT_NODES}; use --method fast or auto"
            )
        return "exact"
    if method == "fast":
        return "fast"
    fits = exact_work(num_nodes, num_layers) / EXACT_WORK_PER_S <= time_limit_s
    return "exact" if num_nodes <= MAX_EXACT_NODES - 2 and fits else "fast"


def _result(problem: Problem, tables: CostTables, path: Path, **extra: Any) -> PlanResult:
    segments = tuple(PlacedSegment(node=tables.node_ids[w], start=s, end=e) for w, s, e in path.steps)
    placement = assign_precisions(problem, Placement(segments=segments))
    evaluation = evaluate(problem, placement)
    if evaluation.violations:  # a solver bug, never user input
        raise InvalidPlan("planner produced an invalid plan: " + "; ".join(evaluation.violations))
    predicted = Predicted(latency_s=evaluation.latency_s, bottleneck_s=evaluation.bottleneck_s)
    summary = None if problem.precision is None else precision_summary(problem, placement)
    return PlanResult(feasible=True, segments=placement.segments, predicted=predicted,
                      objective=problem.objective, weighted_cost=path.cost,
                      return_activations=placement.return_activations, precision=summary, **extra)


def solve(
    problem: Problem,
    *,
    weights: ObjectiveWeights | None = None,
    current_placement: Placement | None = None,
    alternatives: int = 0,
    method: Method = "auto",
    time_limit_s: float = 1.0,
) -> PlanResult:
    """Plan ``problem`` under its objective.

    Args:
        weights: richer objective terms (default all 0: the contract's objective).
        current_placement: the running plan's segments, for the migration-cost term.
        alternatives: also return up to this many next-best distinct plans.
        method: "exact", "fast" or "auto" (exact when it fits ``time_limit_s``).
        time_limit_s: budget used to choose the method (seconds).

    Raises:
        PlanError: method "exact" on an instance too large for it.
    """
    weights = weights or ObjectiveWeights()
    full = build_tables(problem, weights, current_placement)
    tables = full.restrict(usable_nodes(full))
    chosen = _choose_method(method, tables.num_nodes, tables.num_layers, time_limit_s)
    tolerance = weights.bottleneck_tolerance
    search = tables
    if problem.source_min_trust > problem.node(problem.source).trust:
        return PlanResult(feasible=False, reason=explain(problem, full),
                          objective=problem.objective, method=chosen, optimal=True)
    if chosen == "exact":
        path = solve_exact(tables, problem.objective, tolerance=tolerance)
        if path is None:
            return PlanResult(feasible=False, reason=explain(problem, full),
                              objective=problem.objective, method="exact", optimal=True)
        result = _result(problem, tables, path, method="exact", optimal=True)
        search = tables
    else:
        path, bound, proven = solve_fast(tables, problem.objective, FAST_CANDIDATES,
                                         FAST_MAX_CANDIDATES, tolerance)
        if path is None:
            reason = explain(problem, full) if bound is None or proven else (
                f"nodes: the fast method found no plan over its {FAST_MAX_CANDIDATES} best "
                f"candidate nodes (the relaxation is feasible); try --method exact")
            return PlanResult(feasible=False, reason=reason, objective=problem.objective,
                              method="fast", optimal=bound is None)
        result = _result(problem, tables, path, method="fast", optimal=proven,
                         lower_bound=None if bound is None else bound.value)
        if alternatives > 0 and bound is not None:
            keep = sorted({w for w, _, _ in path.steps}
                          | set(candidate_order(tables, problem.objective)[:FAST_CANDIDATES]))
            search = tables.restrict(keep)
            local = {node: i for i, node in enumerate(sorted(set(keep) | {tables.source}))}
            path = Path(tuple((local[w], s, e) for w, s, e in path.steps), path.cost, path.bottleneck)
    if alternatives > 0:
        others = next_best(search, problem.objective, alternatives, path)
        result = result.model_copy(update={"alternatives": tuple(
            _result(problem, search, other, method=result.method, optimal=False)
            for other in others)})
    return result


def _key(objective: str, path: Path) -> tuple[Any, ...]:
    primary = (path.cost,) if objective == "latency" else (path.bottleneck, path.cost)
    return primary + (len(path.steps), path.steps)


def next_best(tables: CostTables, objective: str, count: int, best: Path) -> list[Path]:
    """Up to ``count`` distinct plans after ``best``, in objective order (Lawler).

    The plan space is partitioned by "shares the first i segments, differs at the next":
    each part is solved exactly from a fixed prefix with the next segment banned.
    """
    heap: list[tuple[tuple[Any, ...], int, Path, int, frozenset[tuple[int, int]]]] = []
    found: list[Path] = []
    counter = 0

    def expand(path: Path, depth: int, banned: frozenset[tuple[int, int]]) -> None:
        for i in range(depth, len(path.steps)):
            node, _, end = path.steps[i]
            ban = frozenset({(node, end)}) | (banned if i == depth else frozenset())
            sub = solve_exact(tables, objective, Start(prefix=path.steps[:i], banned=ban))
            if sub is not None and math.isfinite(sub.cost):
                nonlocal counter
                counter += 1
                heapq.heappush(heap, (_key(objective, sub), counter, sub, i, ban))

    expand(best, 0, frozenset())
    while heap and len(found) < count:
        _, _, path, depth, banned = heapq.heappop(heap)
        found.append(path)
        expand(path, depth, banned)
    return found

