"""When the first plan may be made (pure): the live profile has settled.

The first plan is only as good as the profile it rests on. A node with no compute
measurement hosts nothing, and a link the monitor has not measured yet (bandwidth 0) is
unusable (docs/PLANNER.md), so planning on the very first profile can give the entry
alone (``car[0,6)``) although a split is far better a second later. The first plan
therefore waits until every expected node (``--expect-nodes`` and the entry) is alive
with a compute measurement (its start-up benchmark or real forwards) and every link of the profile between two of them has a
bandwidth; it waits for the links at most ``initial_wait_s`` after the nodes were ready,
then plans on what it has (a link that never gets measured must not stall the system).
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.messages import CapacityProfile, NodeCapacity


def nodes_missing(profile: CapacityProfile, expected: Iterable[str]) -> list[str]:
    """Expected nodes that are not alive with a compute measurement, with why."""
    nodes: dict[str, NodeCapacity] = {n.node: n for n in profile.nodes}
    missing = []
    for name in sorted(set(expected)):
        node = nodes.get(name)
        if node is None or not node.alive:
            missing.append(f"{name} not alive")
        elif node.flops_per_s <= 0:
            missing.append(f"{name} not measured")
    return missing


def links_missing(profile: CapacityProfile, expected: Iterable[str]) -> list[str]:
    """Links of the profile between two expected nodes with no bandwidth measured yet."""
    names = set(expected)
    return sorted(f"{link.src}->{link.dst}" for link in profile.links
                  if link.src in names and link.dst in names and link.bandwidth_bytes_per_s <= 0)  # fmt: skip


def first_plan_wait(profile: CapacityProfile, expected: Iterable[str], nodes_ready_at_s: float | None,
                    now_s: float, initial_wait_s: float) -> str | None:  # fmt: skip
    """None when the first plan may be made on ``profile``; else what it still waits for.

    ``nodes_ready_at_s``: when every expected node was first seen measured (None: not yet);
    after ``initial_wait_s`` from then, unmeasured links no longer hold the plan back."""
    expected = tuple(expected)
    nodes = nodes_missing(profile, expected)
    if nodes:
        return "waiting for nodes: " + ", ".join(nodes)
    links = links_missing(profile, expected)
    if links and (nodes_ready_at_s is None or now_s - nodes_ready_at_s < initial_wait_s):
        return "waiting for link measurements: " + ", ".join(links)
    return None
