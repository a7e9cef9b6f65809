"""Why a problem is infeasible, in one sentence that names the constraint.

Checks run from the most specific to the most general: the privacy rule on the source,
one layer that no node may host (trust, memory, utilization), the listed links (with
node reuse allowed), and finally "each node at most once" together with the rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.planning.objectives import CostTables
from shared.planning.problem import Problem, layer_memory_bytes, total
from shared.planning.solver_exact import SubsetDP, solve_exact
from shared.planning.solver_fast import relaxed_forward

EXACT_DIAGNOSIS_NODES = 12


def source_reason(problem: Problem) -> str | None:
    """The privacy rule on the source (embedding and head), if it is broken."""
    source = problem.node(problem.source)
    if source.trust < problem.source_min_trust:
        return (f"source {problem.source!r} has trust {source.trust}, but the embedding and "
                f"head need trust >= {problem.source_min_trust}")
    return None


def layer_reason(problem: Problem) -> str | None:
    """A layer that no node may host, and which rule stops it."""
    for index, layer in enumerate(problem.layers):
        need = layer_memory_bytes(problem, layer)
        trusted = [n for n in problem.nodes if n.trust >= layer.min_trust]
        running = [n for n in trusted if n.utilization < 1]
        if any(n.memory_bytes >= need for n in running):
            continue
        if not trusted:
            return f"no node has trust >= {layer.min_trust} for layer {index}"
        if not running:
            return (f"every node with trust >= {layer.min_trust} is fully utilized, so none "
                    f"can run layer {index}")
        largest = max(running, key=lambda n: (n.memory_bytes, n.id))
        return (f"no node with trust >= {layer.min_trust} has memory for layer {index} "
                f"(needs {need:.0f} bytes; the most free is {largest.memory_bytes:.0f} on "
                f"{largest.id!r})")
    return None


def furthest_layer(tables: CostTables) -> int:
    """How far partial plans get: L if every layer can be placed, else the first layer
    no partial plan reaches. Exact (distinct nodes) for small tables, else relaxed."""
    reached: np.ndarray
    if tables.num_nodes <= EXACT_DIAGNOSIS_NODES:
        state: tuple[Any, ...] = (0, tables.source, 0, 0.0, frozenset())
        values = SubsetDP(tables.compute, tables.hop, False, state).run().values
        reached = np.asarray(np.isfinite(values.reshape(values.shape[0], -1)).any(axis=1))
    else:
        forward = relaxed_forward(tables.compute, tables.hop, tables.source, False)
        reached = np.asarray(np.isfinite(forward).any(axis=1))
    return max((e for e in range(1, tables.num_layers + 1) if reached[e]), default=0)


def _feasible(tables: CostTables) -> bool:
    if furthest_layer(tables) < tables.num_layers:
        return False
    if tables.num_nodes <= EXACT_DIAGNOSIS_NODES:
        return solve_exact(tables, "latency") is not None
    forward = relaxed_forward(tables.compute, tables.hop, tables.source, False)
    back = forward[tables.num_layers] + tables.hop[:, tables.source, tables.num_layers]
    return bool(np.isfinite(back).any())


def _with_hops(tables: CostTables, hop: np.ndarray) -> CostTables:
    return CostTables(tables.node_ids, tables.source, tables.compute, tables.cost, hop)


def link_reason(problem: Problem, tables: CostTables) -> str | None:
    """If the plan would exist with every link present, which part of the links fails."""
    all_links = np.zeros_like(tables.hop)
    if not _feasible(_with_hops(tables, all_links)):
        return None  # memory, trust and "once per node" already rule it out
    free_return = tables.hop.copy()
    free_return[:, tables.source, tables.num_layers] = 0.0
    if _feasible(_with_hops(tables, free_return)):
        return (f"links: no node that can run the last layer has a listed link back to "
                f"source {problem.source!r} (every plan would be feasible otherwise)")
    furthest = furthest_layer(tables)
    if furthest == 0:
        return (f"links: no listed link from source {problem.source!r} reaches a node that "
                f"can run layer 0")
    return (f"links: over the listed links no plan can place layer {furthest} after layers "
            f"0-{furthest - 1} (it would be feasible if every link existed)")


def reuse_reason(problem: Problem, furthest: int) -> str:
    """Reason when only "each node at most once" (with memory, trust, links) fails.

    ``furthest``: the first layer no partial plan with distinct nodes can reach (L when
    every layer is reachable but the output cannot return).
    """
    if furthest >= len(problem.layers):
        return ("nodes: every plan that covers all layers would need a node twice to "
                f"return the output to source {problem.source!r} over the listed links")
    trust = problem.layers[furthest].min_trust
    first = furthest
    while first > 0 and problem.layers[first - 1].min_trust >= trust:
        first -= 1
    last = furthest
    while last + 1 < len(problem.layers) and problem.layers[last + 1].min_trust >= trust:
        last += 1
    window = problem.layers[first : last + 1]
    need = total(layer_memory_bytes(problem, layer) for layer in window)
    able = sorted(n.id for n in problem.nodes if n.trust >= trust and n.utilization < 1)
    free = total(problem.node(i).memory_bytes for i in able)
    if trust > 0 and need > free:
        return (f"layers {first}-{last} need trust >= {trust} and {need:.0f} bytes, but "
                f"the nodes with trust >= {trust} ({', '.join(able)}) have {free:.0f} bytes "
                f"free, one segment each")
    return (f"layers 0-{furthest} cannot be placed with each node used at most once "
            f"(memory, trust and links together leave no such plan)")


def explain(problem: Problem, tables: CostTables) -> str:
    """The most specific reason a problem is infeasible (tables: all nodes, unpruned)."""
    for reason in (source_reason(problem), layer_reason(problem), link_reason(problem, tables)):
        if reason:
            return reason
    return reuse_reason(problem, furthest_layer(_with_hops(tables, np.zeros_like(tables.hop))))
