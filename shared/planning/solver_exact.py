"""Exact search: a dynamic programme over (next layer, last node, set of used nodes).

``V[j, v, S]`` is the best value of a partial plan that has placed layers [0, j), whose
last segment ran on node v, and whose segments used exactly the node set S (a bitmask).
A transition appends a segment [j, e) on a node w not in S:

    V[e, w, S | {w}] = min over v of  V[j, v, S] (+ or max) hop[v, w, j] (+ or max) seg[w, j, e]

With ``+`` this minimises the additive (latency) cost; with ``max`` the bottleneck.
The inner minimum over v and the loop over e are numpy operations over all subsets S
at once, so the Python loop runs only L x n times. Time O(L^2 n 2^n + L n^2 2^n),
memory O(L n 2^n). A ``Start`` lets the same search continue from a fixed plan prefix
with some first segments banned, which is how alternatives (Lawler's k best) work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.planning.objectives import CostTables

StartState = tuple[int, int, int, float, frozenset[tuple[int, int]]]
"""(first free layer, previous node, used-node mask, value so far, banned (node, end))."""

# Ties within this relative distance are broken by the stable rule, not by float noise.
TIE_REL = 1e-12

Step = tuple[int, int, int]  # (node index, start layer, end layer)


@dataclass(frozen=True)
class Start:
    """A search start: layers [0, layer) already placed by ``prefix``."""

    prefix: tuple[Step, ...] = ()
    banned: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # (node, end)

    def state(self, tables: CostTables) -> tuple[int, int, int, float, float]:
        """(next layer, last node, used mask, cost so far, bottleneck so far)."""
        layer, node, used, cost, bottleneck = 0, tables.source, 0, 0.0, 0.0
        for w, start, end in self.prefix:
            hop = float(tables.hop[node, w, start])
            cost = (cost + hop) + float(tables.cost[w, start, end])
            bottleneck = max(bottleneck, hop, float(tables.compute[w, start, end]))
            layer, node, used = end, w, used | (1 << w)
        return layer, node, used, cost, bottleneck


@dataclass(frozen=True)
class Path:
    """A complete plan over table indices, with the DP's cost and bottleneck."""

    steps: tuple[Step, ...]
    cost: float
    bottleneck: float


def combine(use_max: bool, left: Any, right: Any) -> Any:
    """max or sum of two values or arrays (numpy broadcasting)."""
    return np.maximum(left, right) if use_max else left + right


def _last_end(seg: np.ndarray) -> np.ndarray:
    """``last[w, j]``: the largest e with seg[w, j, e] finite (j when none)."""
    finite = np.isfinite(seg)
    size = seg.shape[1]
    ends = np.arange(size)
    return np.asarray(np.where(finite, ends[None, None, :], -1).max(axis=2).clip(min=np.arange(size)[None, :]))


class SubsetDP:
    """The DP over one pair of (segment, hop) tables, from one start."""

    def __init__(self, seg: np.ndarray, hop: np.ndarray, use_max: bool, start_state: StartState) -> None:
        self.seg, self.hop, self.use_max = seg, hop, use_max
        self.layer0, self.prev0, self.used0, self.value0, self.banned = start_state
        self.num_nodes = seg.shape[0]
        self.num_layers = seg.shape[1] - 1
        masks = np.arange(1 << self.num_nodes)
        self.without = [masks[(masks >> w) & 1 == 0] for w in range(self.num_nodes)]
        self.values = np.full((self.num_layers + 1, self.num_nodes, 1 << self.num_nodes), np.inf)

    def _first_candidates(self, w: int) -> np.ndarray:
        j0 = self.layer0
        hop = self.hop[self.prev0, w, j0]
        cand = combine(self.use_max, combine(self.use_max, self.value0, hop), self.seg[w, j0, j0 + 1 :])
        for node, end in self.banned:
            if node == w:
                cand[end - j0 - 1] = np.inf
        return np.asarray(cand)

    def run(self) -> SubsetDP:
        j0, values = self.layer0, self.values
        for w in range(self.num_nodes):
            if not (self.used0 >> w) & 1:
                values[j0 + 1 :, w, self.used0 | (1 << w)] = self._first_candidates(w)
        last = _last_end(self.seg)
        for j in range(j0 + 1, self.num_layers):
            active = np.flatnonzero(np.isfinite(values[j]).any(axis=1))
            if active.size == 0:
                continue
            rows = values[j][active]
            for w in range(self.num_nodes):
                hi = last[w, j]
                if hi <= j or (self.used0 >> w) & 1:
                    continue
                cols = self.without[w]
                hops = self.hop[active, w, j][:, None]
                arrive = combine(self.use_max, rows[:, cols], hops).min(axis=0)
                cand = combine(self.use_max, arrive[None, :], self.seg[w, j, j + 1 : hi + 1, None])
                target = cols | (1 << w)
                values[j + 1 : hi + 1, w, target] = np.minimum(values[j + 1 : hi + 1, w, target], cand)
        return self

    def final(self, source: int) -> tuple[float, int, int] | None:
        """(value, last node, used mask) of the best complete plan; stable tie rule."""
        totals = combine(self.use_max, self.values[self.num_layers], self.hop[:, source, self.num_layers][:, None])
        best = float(totals.min())
        if not np.isfinite(best):
            return None
        slack = 0.0 if self.use_max else abs(best) * TIE_REL
        nodes, masks = np.nonzero(totals <= best + slack)
        counts = np.array([bin(int(mask)).count("1") for mask in masks])
        order = np.lexsort((nodes, masks, counts))  # fewest segments, smallest set, node
        node, mask = int(nodes[order[0]]), int(masks[order[0]])
        return float(totals[node, mask]), node, mask

    def backtrack(self, node: int, mask: int) -> tuple[Step, ...]:
        """Recover the segments of the state (L, node, mask), last segment first."""
        steps: list[Step] = []
        end, value = self.num_layers, self.values[self.num_layers, node, mask]
        while True:
            before = mask & ~(1 << node)
            if before == self.used0:
                steps.append((node, self.layer0, end))
                break
            for j in range(end - 1, self.layer0, -1):  # latest split point first
                cand = combine(self.use_max, combine(self.use_max, self.values[j, :, before], self.hop[:, node, j]), self.seg[node, j, end])
                hits = np.flatnonzero(cand == value)
                if hits.size:
                    steps.append((node, j, end))
                    node, mask, end = int(hits[0]), before, j
                    value = self.values[j, node, mask]
                    break
            else:  # pragma: no cover - the DP values always have a predecessor
                raise RuntimeError("subset DP backtrack found no predecessor")
        return tuple(reversed(steps))


def path_values(tables: CostTables, steps: tuple[Step, ...]) -> Path:
    """The path through ``steps`` with its end-to-end cost and bottleneck (s), hops from
    and back to the source included."""
    node, cost, bottleneck = tables.source, 0.0, 0.0
    for w, start, end in steps:
        hop = float(tables.hop[node, w, start])
        cost = (cost + hop) + float(tables.cost[w, start, end])
        bottleneck = max(bottleneck, hop, float(tables.compute[w, start, end]))
        node = w
    back = float(tables.hop[node, tables.source, tables.num_layers])
    return Path(steps=steps, cost=cost + back, bottleneck=max(bottleneck, back))


def _solve(tables: CostTables, seg: np.ndarray, hop: np.ndarray, use_max: bool, start: Start) -> Path | None:
    layer, node, used, cost, bottleneck = start.state(tables)
    value0 = bottleneck if use_max else cost
    dp = SubsetDP(seg, hop, use_max, (layer, node, used, value0, start.banned)).run()
    best = dp.final(tables.source)
    if best is None:
        return None
    return path_values(tables, start.prefix + dp.backtrack(best[1], best[2]))


def best_bottleneck(tables: CostTables, start: Start = Start()) -> float | None:
    """The smallest achievable bottleneck (seconds), or None if nothing is feasible."""
    path = _solve(tables, tables.compute, tables.hop, True, start)
    return None if path is None else path.bottleneck


def solve_exact(tables: CostTables, objective: str, start: Start = Start(), tolerance: float = 0.0) -> Path | None:
    """The optimal plan from ``start``: min cost (latency), or min bottleneck then cost.

    For throughput, a bottleneck-only DP finds the optimum B*, then the cost DP runs on
    tables where every term above B* x (1 + tolerance) is forbidden.
    """
    if objective == "latency":
        return _solve(tables, tables.cost, tables.hop, False, start)
    threshold = best_bottleneck(tables, start)
    if threshold is None:
        return None
    seg, hop = threshold_tables(tables, threshold * (1.0 + tolerance))
    return _solve(tables, seg, hop, False, start)


def threshold_tables(tables: CostTables, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(cost, hop) tables with every compute or hop term above ``threshold`` forbidden."""
    seg = np.where(tables.compute <= threshold, tables.cost, np.inf)
    hop = np.where(tables.hop <= threshold, tables.hop, np.inf)
    return seg, hop


def exact_work(num_nodes: int, num_layers: int) -> float:
    """A rough count of the DP's element operations (for choosing a method)."""
    return float(num_layers) * num_nodes * (num_nodes + num_layers / 2 + 8) * (1 << max(num_nodes - 1, 0))
