"""The static split rule: blocks in proportion to node speed, private blocks on the entry.

A pure function used for the first plan before the split reviser has a live profile,
and by `edgesplit up --static`. The planner (services/split_reviser) replaces it when
the control loop runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import ConfigError
from shared.topology import Topology


@dataclass(frozen=True, slots=True)
class Assignment:
    """Blocks [start, end) of the model run on `node`."""

    node: str
    start: int
    end: int


def proportional_counts(weights: list[float], total: int) -> list[int]:
    """Split `total` items into len(weights) positive counts in proportion to weights.

    Largest-remainder rounding, ties broken by position, so the result is deterministic.
    Requires total >= len(weights) and positive weights.
    """
    if total < len(weights):
        raise ValueError(f"cannot give {len(weights)} parts at least one of {total}")
    spare = total - len(weights)
    weight_sum = sum(sorted(weights))
    exact = [spare * weight / weight_sum for weight in weights]
    counts = [1 + int(share) for share in exact]
    leftover = total - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for index in order[:leftover]:
        counts[index] += 1
    return counts


def static_plan(topology: Topology, num_layers: int) -> list[Assignment]:
    """Segments in pipeline order: the entry first (holding at least the private blocks),
    then the other nodes by descending trust, speed and id.

    Raises ConfigError when the private blocks cannot all stay on the entry.
    """
    if num_layers < 1:
        raise ConfigError("the model has no blocks to place")
    entry = topology.entry_node()
    private = min(topology.private_blocks, num_layers)
    others = sorted(
        (node for node in topology.nodes if node.id != entry.id),
        key=lambda node: (-node.trust, -node.speed, node.id),
    )
    nodes = [entry, *others][:num_layers]
    counts = proportional_counts([node.speed for node in nodes], num_layers)
    if counts[0] < private:
        # The entry keeps the private blocks; the rest is shared by speed among the others.
        rest = num_layers - private
        tail = nodes[1 : 1 + rest]
        counts = [private, *proportional_counts([node.speed for node in tail], rest)] if tail else [num_layers]
        nodes = [entry, *tail]
    assignments: list[Assignment] = []
    start = 0
    for node, count in zip(nodes, counts, strict=True):
        if count == 0:
            continue
        assignments.append(Assignment(node=node.id, start=start, end=start + count))
        start += count
    return assignments
