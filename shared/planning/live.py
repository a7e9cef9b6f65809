"""From live measurements to the planner's problem (pure: no I/O, no clock).

``problem_from_profile`` turns the monitor's `CapacityProfile`, the model's shard
manifest and a privacy policy into the same `Problem` that ``edgesplit plan`` parses
from a file, so a live answer can be checked by writing ``problem_to_json(problem)``
to a file and running the command on it. The mapping (docs/PLANNER.md, "From live
measurements to the problem's numbers"):

| problem field                   | taken from                                              |
|---------------------------------|---------------------------------------------------------|
| ``layers[l].flops``             | manifest ``blocks[l].flops_per_token`` (FLOP/token)     |
| ``layers[l].weight_bytes``      | max(``blocks[l].bytes``, b x ``parameters``): a worker  |
|                                 | holds fp32 tensors (b = 4) unless the manifest's        |
|                                 | ``weights`` says bf16 (b = 2) or int8 / int4 (b = 2:    |
|                                 | fbgemm's packed int8 pads rows, measured 1.0-1.8 bytes) |
| ``layers[l].kv_bytes_per_token``| manifest ``blocks[l].kv_bytes_per_token``               |
| ``layers[l].out_bytes``         | manifest ``blocks[l].activation_bytes_per_token``       |
| ``layers[l].min_trust``         | the privacy policy (``apply_policy``)                   |
| ``input_bytes``                 | ``blocks[0].activation_bytes_per_token`` (the embedding |
|                                 | emits a hidden state as wide as every block's output)   |
| ``source_min_trust``            | the policy's trusted level (embedding and head)         |
| ``nodes[n]``                    | profile nodes with ``alive`` true; down nodes are left  |
|                                 | out, and so are their links                             |
| ``nodes[n].trust``              | ``NodeCapacity.trust``                                  |
| ``nodes[n].memory_bytes``       | ``NodeCapacity.memory_free_bytes`` (free for blocks)    |
| ``nodes[n].flops_per_s``        | ``NodeCapacity.flops_per_s`` (measured)                 |
| ``nodes[n].utilization``        | ``NodeCapacity.utilisation``                            |
| ``nodes[n].batch_scaling``      | ``NodeCapacity.decode_batch_scaling`` (None: unmeasured)|
| ``expected_batch``              | the caller's expected concurrency (None or 1: unbatched)|
| ``links``                       | ``LinkCapacity`` between kept nodes with a measured     |
|                                 | bandwidth > 0 (bandwidth and latency as measured)       |

A node whose speed is not measured yet (``flops_per_s`` 0) can host no block: it is
left out, except the source, which is kept (it runs the embedding and head) with
utilization 1, the problem's way of saying "hosts no layers".
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.errors import PlanError
from shared.messages import CapacityProfile, LinkCapacity, NodeCapacity, PrivacyPolicy
from shared.model.manifest import ShardManifest
from shared.planning.privacy import apply_policy
from shared.planning.problem import (
    Layer,
    Link,
    Node,
    Objective,
    Problem,
)

FP32_BYTES = 4
UNMEASURED_FLOPS_PER_S = 1.0
"""Speed given to a source whose speed is not measured; its utilization 1 means it hosts
no layers, so this number never enters a cost."""


_HELD_BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 2, "int8": 2, "int4": 2}
"""Resident bytes per parameter of a loaded block, by the store's ``weights``
(docs/PERFORMANCE.md, "Quantised weights")."""


class LiveProfileError(PlanError):
    """A capacity profile cannot be turned into a problem (the message names the field)."""


def layers_from_manifest(manifest: ShardManifest) -> tuple[Layer, ...]:
    """The problem's layers (min_trust 0) from a shard manifest's per-block costs."""
    return tuple(
        Layer(
            flops=float(block.flops_per_token),
            weight_bytes=float(max(block.bytes, _HELD_BYTES_PER_PARAMETER.get(
                manifest.weights, FP32_BYTES) * block.parameters)),  # fmt: skip
            kv_bytes_per_token=float(block.kv_bytes_per_token),
            out_bytes=float(block.activation_bytes_per_token),
        )
        for block in manifest.blocks
    )


def nodes_from_profile(profile: CapacityProfile, source: str) -> tuple[Node, ...]:
    """Alive nodes of the profile as problem nodes (see the module's table).

    Raises:
        LiveProfileError: the source is missing or down, or a node id repeats.
    """
    seen: set[str] = set()
    nodes: list[Node] = []
    for index, capacity in enumerate(profile.nodes):
        if capacity.node in seen:
            raise LiveProfileError(f"profile.nodes[{index}].node: duplicate node {capacity.node!r}")
        seen.add(capacity.node)
        node = _node(capacity, is_source=capacity.node == source)
        if node is not None:
            nodes.append(node)
    if source not in seen:
        raise LiveProfileError(f"source: {source!r} is not in the capacity profile")
    if not any(node.id == source for node in nodes):
        raise LiveProfileError(f"source: {source!r} is down in the capacity profile")
    return tuple(nodes)


def _node(capacity: NodeCapacity, *, is_source: bool) -> Node | None:
    if not capacity.alive:
        return None
    measured = capacity.flops_per_s > 0
    if not measured and not is_source:
        return None
    return Node(
        id=capacity.node,
        trust=capacity.trust,
        memory_bytes=float(capacity.memory_free_bytes),
        flops_per_s=float(capacity.flops_per_s) if measured else UNMEASURED_FLOPS_PER_S,
        utilization=float(capacity.utilisation) if measured else 1.0,
        batch_scaling=capacity.decode_batch_scaling if measured else None,
    )


def links_from_profile(
    links: tuple[LinkCapacity, ...], node_ids: set[str]
) -> tuple[Link, ...]:
    """Directed links between ``node_ids`` with a measured bandwidth > 0.

    Raises:
        LiveProfileError: a link from a node to itself, or the same link twice.
    """
    seen: set[tuple[str, str]] = set()
    kept: list[Link] = []
    for index, link in enumerate(links):
        pair = (link.src, link.dst)
        if link.src == link.dst:
            raise LiveProfileError(f"profile.links[{index}]: a link from {link.src!r} to itself")
        if pair in seen:
            raise LiveProfileError(f"profile.links[{index}]: duplicate link {link.src!r} -> {link.dst!r}")
        seen.add(pair)
        if link.src in node_ids and link.dst in node_ids and link.bandwidth_bytes_per_s > 0:
            kept.append(Link(src=link.src, dst=link.dst,
                             bandwidth_bytes_per_s=float(link.bandwidth_bytes_per_s),
                             latency_s=float(link.latency_s)))  # fmt: skip
    return tuple(kept)


def problem_from_profile(
    profile: CapacityProfile,
    manifest: ShardManifest,
    policy: PrivacyPolicy,
    objective: Objective = "latency",
    *,
    source: str,
    context_tokens: int = 0,
    concurrent_requests: int = 1,
    expected_batch: float | None = None,
) -> Problem:
    """The planning problem for ``manifest``'s model on the nodes and links ``profile``
    measured, with ``source`` as the entry node and ``policy`` as hard trust rules.

    ``context_tokens`` (tokens of KV cache each request keeps) and
    ``concurrent_requests`` size the KV cache in the memory constraint;
    ``expected_batch`` (requests whose decode steps run as one batch; None or 1: the
    contract's unbatched compute) prices each node's compute at its batch scaling.

    Raises:
        LiveProfileError: the source is missing or down, a node or link repeats, a link
            joins a node to itself, or a value the problem does not accept (named).
    """
    nodes = nodes_from_profile(profile, source)
    links = links_from_profile(profile.links, {node.id for node in nodes})
    try:
        problem = Problem(
            objective=objective,
            source=source,
            input_bytes=float(manifest.blocks[0].activation_bytes_per_token),
            context_tokens=context_tokens,
            concurrent_requests=concurrent_requests,
            expected_batch=None if expected_batch is None or expected_batch == 1 else float(expected_batch),
            layers=layers_from_manifest(manifest),
            nodes=nodes,
            links=links,
        )
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "problem"
        raise LiveProfileError(f"{where}: {first['msg']}") from None
    return apply_policy(problem, policy)


def problem_to_json(problem: Problem) -> dict[str, Any]:
    """The problem as a JSON object in the file format (``parse_problem`` reads it back
    to an equal Problem; optional fields that are unset are left out)."""
    return problem.model_dump(mode="json", exclude_none=True)
