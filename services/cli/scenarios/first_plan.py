"""The first plan every policy of a scenario starts from: the planner's best plan for the
scenario's *declared* initial conditions (the topology's speeds, memory, trust and links).

Before, each policy's orchestrator planned its first plan on its own first measured
profile. On MiniLM the blocks take a tenth of a millisecond per token, and one
start-up benchmark on a loaded machine could make the 0.6-speed box look faster than the
1.0 one, so the three policies started from different plans (one smart-city run's
static policy started on the box the scenario later slows, another's on the other box)
and the comparison measured luck. Here the planner runs once, on a profile built from
the topology with one block timed in this process, and each policy's orchestrator is
told to start from that plan (`--first-plan`), so static, migrate and adaptive differ
only in what they do after it.

The block is timed like a worker times it (`benchmark_block`: the thread's CPU time,
one torch thread); each node's time is that scaled by its slowdown (1 / speed).
"""

from __future__ import annotations

import time

from services.cli.client import NoFeasiblePlan
from shared.ids import NodeId
from shared.messages import CapacityProfile, LinkCapacity, NodeCapacity, Segment
from shared.model.shard import ShardStore
from shared.planning.solver import solve
from shared.planning.view import CostModel, planning_problem, planning_view
from shared.topology import Topology


def format_layout(segments: tuple[Segment, ...]) -> str:
    """``gateway:0:1,edge1:1:6``: the orchestrator's ``--first-plan`` form."""
    return ",".join(f"{s.node}:{s.start}:{s.end}" for s in segments)


def declared_profile(topology: Topology, decode_s_per_block: float,
                     prefill_s_per_block_token: float) -> CapacityProfile:  # fmt: skip
    """A capacity profile of the topology as declared: every node alive and idle, its
    block times the measured ones times its slowdown, every link at its declared rate."""
    nodes = tuple(
        NodeCapacity(node=NodeId(node.id), alive=True, trust=node.trust, memory_free_bytes=int(node.memory_bytes),
                     memory_bytes=int(node.memory_bytes), flops_per_s=0.0, utilisation=0.0,
                     decode_s_per_block=decode_s_per_block * node.slowdown,
                     prefill_s_per_block_token=prefill_s_per_block_token * node.slowdown,
                     compute_source="benchmark", blocks_held=0)
        for node in topology.nodes
    )  # fmt: skip
    links = tuple(
        LinkCapacity(src=NodeId(src), dst=NodeId(dst), bandwidth_bytes_per_s=link.bandwidth_bytes_per_s,
                     latency_s=link.latency_s, rtt_s=2 * link.latency_s, health="ok",
                     bandwidth_source="probe")
        for (src, dst), link in topology.directed_links().items()
    )  # fmt: skip
    return CapacityProfile(as_of_s=time.time(), nodes=nodes, links=links)


def plan_for(topology: Topology, store: ShardStore, decode_s_per_block: float,
             prefill_s_per_block_token: float) -> tuple[Segment, ...]:  # fmt: skip
    """The planner's best plan for ``topology`` with these block times. Raises
    NoFeasiblePlan (naming the planner's reason) when the declared topology has none."""
    manifest = store.manifest
    profile = declared_profile(topology, decode_s_per_block, prefill_s_per_block_token)
    view = planning_view(profile, manifest, ())
    entry = topology.entry_node().id
    cost = CostModel.at_load(view, entry, 200e6, 0)
    problem = planning_problem(view, manifest, topology.privacy_policy(), entry, cost)
    result = solve(problem)
    if not result.feasible:
        raise NoFeasiblePlan(f"the declared topology has no feasible plan: {result.reason}")
    return tuple(Segment(node=s.node, start=s.start, end=s.end) for s in result.segments)  # type: ignore[arg-type]


def declared_first_plan(topology: Topology, store: ShardStore, present: list[str]) -> tuple[Segment, ...]:
    """Time one block here (a few forwards of block 0) and plan the declared topology's
    ``present`` nodes (those that join later are not there for the first plan)."""
    topology = topology.model_copy(update={
        "nodes": [n for n in topology.nodes if n.id in present],
        "links": [link for link in topology.links if link.src in present and link.dst in present],
    })  # fmt: skip
    import torch

    from shared.model.benchmark import benchmark_block

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker with threads = 1 times it
    try:
        decode_s, prefill_s = benchmark_block(store, 1.0)
    finally:
        torch.set_num_threads(threads)
    return plan_for(topology, store, decode_s, prefill_s)
