"""Objective weights and the cost tables every solver works on.

A plan's weighted cost is additive over its segments and hops, which is what makes the
dynamic programmes exact (docs/PLANNER.md, "Objective"):

    cost = latency + balance x sum_seg u(n) compute(seg, n)
                   + privacy_s x sum_layers max(0, preferred_trust(l) - trust(n(l)))
                   + migration x sum_seg migration_s(seg, n)

Every weight defaults to 0, and then the cost is exactly the contract's latency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.errors import PlanError
from shared.planning.problem import (
    Link,
    Node,
    Placement,
    Problem,
    batch_factor,
    boundary_bytes,
    effective_flops_per_s,
    evaluate,
    layer_memory_bytes,
    total,
    transfer_s,
)


@dataclass(frozen=True)
class ObjectiveWeights:
    """Weights of the richer objective terms (all 0: the contract's objective).

    Attributes:
        balance: per second of compute placed on a node, times its utilization (0..1):
            moves work from busy nodes to idle ones beyond what their speed alone says.
        privacy_s: seconds charged per layer per trust level its host falls short of the
            layer's ``preferred_trust``.
        migration: per-token seconds charged per second of one-off migration time
            (weights fetched and loaded, KV cache rebuilt); 1/horizon_tokens amortises it.
        bottleneck_tolerance: throughput objective only: the plan may have a bottleneck
            up to (1 + tolerance) x the optimum if that lowers the weighted cost.
    """

    balance: float = 0.0
    privacy_s: float = 0.0
    migration: float = 0.0
    bottleneck_tolerance: float = 0.0

    def __post_init__(self) -> None:
        for name in ("balance", "privacy_s", "migration", "bottleneck_tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise PlanError(f"weights.{name}: must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class CostTables:
    """Dense cost arrays over node indices (nodes sorted by id) and layer boundaries.

    ``compute[w, j, e]``: seconds for layers [j, e) on node w; inf where that segment
    may not run there (memory, trust, utilization >= 1, or e <= j).
    ``cost[w, j, e]``: compute plus the weighted extra terms (inf where compute is).
    ``hop[v, w, j]``: seconds to send the bytes that enter layer j (j = L: the output
    returning to the source) from v to w; inf without a link, 0 when v == w.
    """

    node_ids: tuple[str, ...]
    source: int
    compute: np.ndarray
    cost: np.ndarray
    hop: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.node_ids)

    @property
    def num_layers(self) -> int:
        return int(self.compute.shape[1]) - 1

    def restrict(self, keep: Sequence[int]) -> CostTables:
        """The tables over a subset of node indices (the source is always kept)."""
        chosen = sorted(set(keep) | {self.source})
        index = np.asarray(chosen)
        return CostTables(
            node_ids=tuple(self.node_ids[i] for i in chosen),
            source=chosen.index(self.source),
            compute=self.compute[index],
            cost=self.cost[index],
            hop=self.hop[np.ix_(index, index)],
        )


def _segment_sums(values: Sequence[float]) -> np.ndarray:
    """``out[j, e] = fsum(values[j:e])`` (correctly rounded, order independent)."""
    size = len(values)
    out = np.zeros((size + 1, size + 1))
    for start in range(size):
        for end in range(start + 1, size + 1):
            out[start, end] = total(values[start:end])
    return out


def _prefix_segments(per_layer: np.ndarray) -> np.ndarray:
    """(n, L) per-layer values -> (n, L+1, L+1) segment sums via prefix differences."""
    prefix = np.concatenate([np.zeros((per_layer.shape[0], 1)), np.cumsum(per_layer, axis=1)], 1)
    return np.asarray(prefix[:, None, :] - prefix[:, :, None])


def _extra_terms(
    problem: Problem, nodes: Sequence[Node], compute: np.ndarray, weights: ObjectiveWeights,
    current_placement: Placement | None,
) -> np.ndarray:
    shape = compute.shape
    extra = np.zeros(shape)
    feasible = np.isfinite(compute)
    if weights.balance > 0:
        util = np.array([min(node.utilization, 1.0) for node in nodes])
        extra += weights.balance * np.where(feasible, compute, 0.0) * util[:, None, None]
    if weights.privacy_s > 0:
        deficit = np.array([[max(0, (layer.preferred_trust or 0) - node.trust)
                             for layer in problem.layers] for node in nodes], dtype=float)
        extra += weights.privacy_s * _prefix_segments(deficit)
    if weights.migration > 0 and current_placement is not None:
        per_layer = np.array([[layer_migration_s(problem, node, index, current_placement)
                               for index in range(len(problem.layers))] for node in nodes])
        extra += weights.migration * _prefix_segments(per_layer)
    return extra


def layer_migration_s(problem: Problem, node: Node, layer_index: int, current_placement: Placement) -> float:
    """One-off seconds to move layer ``layer_index`` onto ``node`` (0 if it holds it).

    Fetching the weights at the node's load bandwidth, loading them at its measured
    seconds per byte, and rebuilding the layer's KV cache for the context by recompute.
    """
    holder = next((seg.node for seg in current_placement.segments
                   if seg.start <= layer_index < seg.end), None)
    if holder == node.id:
        return 0.0
    layer = problem.layers[layer_index]
    fetch = (layer.weight_bytes / node.load_bandwidth_bytes_per_s
             if node.load_bandwidth_bytes_per_s else 0.0)
    load = layer.weight_bytes * node.shard_load_s_per_byte
    speed = effective_flops_per_s(node)
    tokens = problem.context_tokens * problem.concurrent_requests
    rebuild = layer.flops * tokens / speed if speed > 0 else math.inf
    return float(fetch + load + rebuild)


def build_tables(
    problem: Problem, weights: ObjectiveWeights | None = None, current_placement: Placement | None = None
) -> CostTables:
    """Compile a problem into the dense tables the solvers use."""
    weights = weights or ObjectiveWeights()
    nodes = sorted(problem.nodes, key=lambda node: node.id)
    layers = problem.layers
    num_layers = len(layers)
    seg_flops = _segment_sums([layer.flops for layer in layers])
    # The most exact usable weight precision that fits decides (precision.py); fp32 alone
    # without a policy: the contract's memory rule.
    seg_memory = np.minimum.reduce([
        _segment_sums([layer_memory_bytes(problem, layer, weights) for layer in layers])
        for weights in problem.policy.usable_weights()])
    max_trust = np.full((num_layers + 1, num_layers + 1), np.iinfo(np.int64).max)
    for start in range(num_layers):
        running = 0
        for end in range(start + 1, num_layers + 1):
            running = max(running, layers[end - 1].min_trust)
            max_trust[start, end] = running
    compute = np.full((len(nodes), num_layers + 1, num_layers + 1), np.inf)
    for w, node in enumerate(nodes):
        speed = effective_flops_per_s(node)
        if node.utilization >= 1 or speed <= 0:
            continue
        ok = (seg_memory <= node.memory_bytes) & (max_trust <= node.trust)
        factor = batch_factor(problem, node)  # None: the contract's compute, bit for bit
        seconds = seg_flops / speed if factor is None else seg_flops / speed * factor
        compute[w] = np.where(ok, seconds, np.inf)
    extra = _extra_terms(problem, nodes, compute, weights, current_placement)
    cost = np.where(np.isfinite(compute), compute + extra, np.inf)
    return CostTables(
        node_ids=tuple(node.id for node in nodes),
        source=[node.id for node in nodes].index(problem.source),
        compute=compute,
        cost=cost,
        hop=_hop_table(problem, [node.id for node in nodes]),
    )


def _hop_table(problem: Problem, node_ids: list[str]) -> np.ndarray:
    num_layers = len(problem.layers)
    position = {node_id: index for index, node_id in enumerate(node_ids)}
    hop = np.full((len(node_ids), len(node_ids), num_layers + 1), np.inf)
    for link in problem.links:
        hop[position[link.src], position[link.dst]] = [
            transfer_s(link, boundary_bytes(problem, j, hop_precision(problem, link, j)))
            for j in range(num_layers + 1)]
    for index in range(len(node_ids)):
        hop[index, index] = 0.0
    return hop


def hop_precision(problem: Problem, link: Link, boundary: int) -> str:
    """The activation precision for the hop before layer ``boundary`` over ``link`` when
    the quality budget does not bind: the one with the least transfer time among the
    usable ones, a lossy one only where it saves at least ``min_saving_s`` (pure)."""
    policy = problem.policy
    exact_s = transfer_s(link, boundary_bytes(problem, boundary))
    best, best_s = "fp32", exact_s
    for precision in policy.usable_activations()[1:]:
        seconds = transfer_s(link, boundary_bytes(problem, boundary, precision))
        if seconds < best_s and exact_s - seconds >= policy.min_saving_s:
            best, best_s = precision, seconds
    return best


@dataclass(frozen=True)
class ObjectiveTerms:
    """A plan's objective terms, recomputed from the formulas (for checks and reports)."""

    latency_s: float
    bottleneck_s: float
    balance_s: float
    privacy_levels: float
    migration_s: float
    weighted_cost: float


def objective_terms(
    problem: Problem, placement: Placement, weights: ObjectiveWeights | None = None,
    current_placement: Placement | None = None,
) -> ObjectiveTerms:
    """Every objective term of a placement, and the weighted cost the solver minimises."""
    weights = weights or ObjectiveWeights()
    base = evaluate(problem, placement)
    nodes = problem.node_index()
    balance, privacy, migration = [], [], []
    for seg in placement.segments:
        node = nodes[seg.node]
        flops = total(layer.flops for layer in problem.layers[seg.start : seg.end])
        speed, factor = effective_flops_per_s(node), batch_factor(problem, node)
        busy = min(node.utilization, 1.0) * flops / speed if speed > 0 else math.inf
        balance.append(busy if factor is None else busy * factor)
        for index in range(seg.start, seg.end):
            layer = problem.layers[index]
            privacy.append(max(0, (layer.preferred_trust or 0) - node.trust))
            if current_placement is not None:
                migration.append(layer_migration_s(problem, node, index, current_placement))
    terms = (total(balance), total(privacy), total(migration))
    factors = (weights.balance, weights.privacy_s, weights.migration)
    weighted = total([base.latency_s] + [f * t for f, t in zip(factors, terms, strict=True) if f > 0])
    return ObjectiveTerms(base.latency_s, base.bottleneck_s, *terms, weighted)
