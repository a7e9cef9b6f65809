"""The fast method for instances beyond the exact range, and the relaxation bound.

Relaxation: drop "each node at most once" (keep "consecutive segments on different
nodes"). The state is then (next layer, last node) only: O(L^2 n + L n^2) time. Its
optimum is a lower bound on the true optimum, and when its plan happens to use every
node once it *is* the optimum (a certificate).

Fast method: score every node by the relaxed cost of the best plan that uses it
(forward DP + backward DP), keep the source, the relaxed plan's nodes and the best
scored nodes up to k, and run the exact subset DP on those k nodes. If that finds
nothing, k grows. The answer is feasible and exact over the chosen candidates; its gap
to the relaxation bound is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.planning.objectives import CostTables
from shared.planning.solver_exact import (
    Path,
    Step,
    combine,
    path_values,
    solve_exact,
    threshold_tables,
)


def _hop_at(hop: np.ndarray, j: int, num_layers: int, allow_same: bool = False) -> np.ndarray:
    """hop[:, :, j] where a segment may not follow one on the same node (j = 1..L-1)."""
    step = hop[:, :, j].copy()
    if 0 < j < num_layers and not allow_same:
        np.fill_diagonal(step, np.inf)
    return step


def relaxed_forward(seg: np.ndarray, hop: np.ndarray, source: int, use_max: bool,
                    allow_same: bool = False) -> np.ndarray:
    """``F[e, w]``: best value of a relaxed partial plan covering [0, e) ending on w.

    ``allow_same``: a segment may also follow one on the same node (links-only check).
    """
    num_nodes, num_layers = seg.shape[0], seg.shape[1] - 1
    forward = np.full((num_layers + 1, num_nodes), np.inf)
    start = np.full(num_nodes, np.inf)
    start[source] = 0.0
    for j in range(num_layers):
        before = start if j == 0 else forward[j]
        if not np.isfinite(before).any():
            continue
        step = _hop_at(hop, j, num_layers, allow_same)
        arrive = combine(use_max, before[:, None], step).min(axis=0)
        cand = combine(use_max, arrive[:, None], seg[:, j, j + 1 :])
        forward[j + 1 :] = np.minimum(forward[j + 1 :], cand.T)
    return forward


def relaxed_backward(seg: np.ndarray, hop: np.ndarray, source: int, use_max: bool) -> np.ndarray:
    """``G[e, v]``: best value to finish from a segment that ended at layer e on v."""
    num_nodes, num_layers = seg.shape[0], seg.shape[1] - 1
    backward = np.full((num_layers + 1, num_nodes), np.inf)
    backward[num_layers] = hop[:, source, num_layers]
    for e in range(num_layers - 1, 0, -1):
        rest = combine(use_max, seg[:, e, e + 1 :], backward[e + 1 :].T).min(axis=1)
        backward[e] = combine(use_max, _hop_at(hop, e, num_layers), rest[None, :]).min(axis=1)
    return backward


def node_scores(seg: np.ndarray, hop: np.ndarray, source: int, use_max: bool) -> np.ndarray:
    """Per node: the relaxed value of the best plan that gives it a segment (inf: none)."""
    num_nodes, num_layers = seg.shape[0], seg.shape[1] - 1
    forward = relaxed_forward(seg, hop, source, use_max)
    backward = relaxed_backward(seg, hop, source, use_max)
    scores = np.full(num_nodes, np.inf)
    start = np.full(num_nodes, np.inf)
    start[source] = 0.0
    for j in range(num_layers):
        before = start if j == 0 else forward[j]
        arrive = combine(use_max, before[:, None], _hop_at(hop, j, num_layers)).min(axis=0)
        through = combine(use_max, combine(use_max, arrive[:, None], seg[:, j, j + 1 :]), backward[j + 1 :].T)
        scores = np.minimum(scores, through.min(axis=1))
    return scores


def relaxed_plan(seg: np.ndarray, hop: np.ndarray, source: int, use_max: bool) -> tuple[float, tuple[Step, ...]] | None:
    """The relaxation's optimum (value, steps), or None if even it is infeasible."""
    num_layers = seg.shape[1] - 1
    forward = relaxed_forward(seg, hop, source, use_max)
    totals = combine(use_max, forward[num_layers], hop[:, source, num_layers])
    if not np.isfinite(totals.min()):
        return None
    node, end, steps = int(np.argmin(totals)), num_layers, []
    value = forward[num_layers, node]
    while end > 0:
        for j in range(end - 1, -1, -1):
            if j == 0:
                before = np.full(seg.shape[0], np.inf)
                before[source] = 0.0
            else:
                before = forward[j]
            cand = combine(use_max, combine(use_max, before, _hop_at(hop, j, num_layers)[:, node]), seg[node, j, end])
            hits = np.flatnonzero(cand == value)
            if hits.size:
                steps.append((node, j, end))
                node, end = int(hits[0]), j
                value = before[node]
                break
        else:  # pragma: no cover
            raise RuntimeError("relaxed DP backtrack found no predecessor")
    return float(totals.min()), tuple(reversed(steps))


@dataclass(frozen=True)
class Bound:
    """The relaxation's lower bound on the primary objective (s) and its plan."""

    value: float
    steps: tuple[Step, ...]

    @property
    def distinct(self) -> bool:
        nodes = [step[0] for step in self.steps]
        return len(nodes) == len(set(nodes))


def _longest(compute: np.ndarray, threshold: float) -> np.ndarray:
    """Per node: the most layers one segment may hold with compute <= threshold."""
    size = compute.shape[1]
    spans = np.arange(size)[None, :] - np.arange(size)[:, None]
    return np.asarray(np.where(compute <= threshold, spans[None], 0).max(axis=(1, 2)))


def capacity_bound(tables: CostTables, objective: str) -> float:
    """A bottleneck bound that respects "each node once" but ignores links and hops.

    The least threshold T at which the nodes' longest allowed segments (compute <= T)
    add up to L layers; no plan with distinct nodes has a smaller bottleneck. 0 for the
    latency objective (not used there).
    """
    compute, num_layers = tables.compute, tables.num_layers
    if objective == "throughput":
        values = np.unique(compute[np.isfinite(compute)])
        low, high = 0, len(values) - 1
        if high < 0 or _longest(compute, values[high]).sum() < num_layers:
            return 0.0
        while low < high:
            mid = (low + high) // 2
            enough = _longest(compute, values[mid]).sum() >= num_layers
            low, high = (low, mid) if enough else (mid + 1, high)
        return float(values[low])
    return 0.0  # latency: the relaxation alone (see docs/PLANNER.md)


def lower_bound(tables: CostTables, objective: str) -> Bound | None:
    """Relaxed optimum (min weighted cost, or min bottleneck), raised to the capacity
    bound when that is higher; the steps are the relaxation's plan."""
    if objective == "latency":
        found = relaxed_plan(tables.cost, tables.hop, tables.source, False)
    else:
        found = relaxed_plan(tables.compute, tables.hop, tables.source, True)
    if found is None:
        return None
    return Bound(max(found[0], capacity_bound(tables, objective)), found[1])


def _relaxed_throughput_plan(tables: CostTables, threshold: float) -> tuple[Step, ...] | None:
    seg, hop = threshold_tables(tables, threshold)
    found = relaxed_plan(seg, hop, tables.source, False)
    return None if found is None else found[1]


def candidate_order(tables: CostTables, objective: str) -> list[int]:
    """Node indices, most promising first: the source, then by score, then by id."""
    cost_scores = node_scores(tables.cost, tables.hop, tables.source, False)
    keys: list[tuple[float, ...]]
    if objective == "latency":
        keys = [(cost_scores[i], i) for i in range(tables.num_nodes)]
    else:
        bottleneck_scores = node_scores(tables.compute, tables.hop, tables.source, True)
        keys = [(bottleneck_scores[i], cost_scores[i], i) for i in range(tables.num_nodes)]
    ranked = [int(key[-1]) for key in sorted(keys) if np.isfinite(key[0])]
    return list(dict.fromkeys([tables.source] + ranked))


def solve_fast(tables: CostTables, objective: str, k: int, max_k: int, tolerance: float = 0.0) -> tuple[Path | None, Bound | None, bool]:
    """(plan, relaxation bound, proven optimal). Plan is None if none was found.

    Exact subset DP over the k most promising nodes; k grows by 2 up to ``max_k`` while
    nothing is found.
    """
    bound = lower_bound(tables, objective)
    if bound is None:
        return None, None, True  # the relaxation is infeasible, so is the problem
    if objective == "throughput" and tolerance == 0.0:
        steps = _relaxed_throughput_plan(tables, bound.value)
        if steps is not None and len({s[0] for s in steps}) == len(steps):
            return path_values(tables, steps), bound, True
    elif objective == "latency" and bound.distinct:
        return path_values(tables, bound.steps), bound, True
    order = candidate_order(tables, objective)
    size = k
    while True:
        chosen = order[:size]
        sub = tables.restrict(chosen)
        path = solve_exact(sub, objective, tolerance=tolerance)
        if path is not None:
            mapping = sorted(set(chosen) | {tables.source})
            steps = tuple((mapping[w], s, e) for w, s, e in path.steps)
            return path_values(tables, steps), bound, len(order) <= size
        if size >= min(max_k, len(order)):
            return None, bound, False
        size += 2
