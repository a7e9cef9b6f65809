"""The orchestrator's planning view of a capacity profile and its planning problem
(pure). The orchestrator (services/orchestrator/candidates.py, whose docstring explains
the view) and the scenario runner's declared first plan (services/cli/scenarios/
first_plan.py) plan on the same view with the same cost model."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from shared.messages import CapacityProfile, PrivacyPolicy, Segment
from shared.model.manifest import ShardManifest
from shared.planning.live import layers_from_manifest, problem_from_profile
from shared.planning.precision import PrecisionPolicy
from shared.planning.problem import Problem


@dataclass(frozen=True)
class CostModel:
    """Migration-cost inputs (units in names)."""

    shard_load_bytes_per_s: float = 200e6
    """How fast a node fetches, verifies and loads a shard (bytes/s)."""
    rebuild_tokens: int = 0
    """Tokens of KV state to rebuild on a moved block (requests in flight x context)."""
    concurrency: float = 1.0
    """Requests decoding together, the load plans are chosen for: a plan's time per token
    is at least one round of this many requests' steps on its slowest serial stage, a
    batched step where the node's batch scaling is measured (`logic.per_token_s`)."""

    @classmethod
    def at_load(cls, view: CapacityProfile, entry: str, shard_load_bytes_per_s: float,
                context_tokens: int) -> CostModel:  # fmt: skip
        """The cost model under the load of ``view``: the entry's requests in flight decode
        together and each has ``context_tokens`` of KV state to rebuild on a moved block."""
        in_flight = next((n.requests_in_flight for n in view.nodes if n.node == entry), 0)
        return cls(shard_load_bytes_per_s, in_flight * context_tokens, concurrency=expected_load(view, entry))


def expected_load(view: CapacityProfile, entry: str) -> float:
    """Requests expected to decode together: the entry's requests in flight (its latest
    telemetry; at least 1). Its admission queue is left out: those requests wait because
    every slot is taken, so they do not add to a batch; they join as slots free."""
    in_flight = next((n.requests_in_flight for n in view.nodes if n.node == entry), 0)
    return max(1.0, float(in_flight))


def held_blocks(segments: Iterable[Segment]) -> dict[str, int]:
    """Blocks each node holds in a plan."""
    held: dict[str, int] = {}
    for segment in segments:
        held[segment.node] = held.get(segment.node, 0) + segment.end - segment.start
    return held


def planning_view(profile: CapacityProfile, manifest: ShardManifest,
                  running: tuple[Segment, ...]) -> CapacityProfile:  # fmt: skip
    """The profile the orchestrator plans on (module docstring): decode-time speed (an
    encoder's: prefill-time),
    utilisation 0, the running plan's blocks counted as free on their hosts."""
    layers = layers_from_manifest(manifest)
    mean_flops = math.fsum(layer.flops for layer in layers) / len(layers)
    mean_weights = math.fsum(layer.weight_bytes for layer in layers) / len(layers)
    held = held_blocks(running)
    nodes = []
    encoder = manifest.architecture == "bert"  # one pass per request: no decode step
    for node in profile.nodes:
        speed = node.flops_per_s
        block_s = node.prefill_s_per_block_token if encoder else node.decode_s_per_block
        if block_s and mean_flops > 0:
            speed = mean_flops / block_s
        # Add back only blocks the monitor subtracted: just after a commit the node's telemetry
        # may not hold them yet, and adding them then counted them twice (a 2-block node was
        # given 4).
        counted = held.get(node.node, 0) if node.blocks_held is None else min(held.get(node.node, 0), node.blocks_held)
        free = node.memory_free_bytes + int(counted * mean_weights)
        nodes.append(node.model_copy(update={"flops_per_s": speed, "utilisation": 0.0,
                                             "memory_free_bytes": free}))  # fmt: skip
    return profile.model_copy(update={"nodes": tuple(nodes)})


def planning_problem(view: CapacityProfile, manifest: ShardManifest, policy: PrivacyPolicy,
                     source: str, cost: CostModel, precision: PrecisionPolicy | None = None) -> Problem:  # fmt: skip
    """The problem of ``view`` (see ``live.problem_from_profile``), each node's shard load
    rate set for the migration term, and ``precision`` as its precision policy (None:
    exact). Raises LiveProfileError (source missing or down)."""
    problem = problem_from_profile(view, manifest, policy, "latency", source=source)
    nodes = tuple(n.model_copy(update={"load_bandwidth_bytes_per_s": cost.shard_load_bytes_per_s})
                  for n in problem.nodes)  # fmt: skip
    return problem.model_copy(update={"nodes": nodes, "precision": precision})
