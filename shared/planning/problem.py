"""The placement-partitioning problem, placements, and an independent evaluator.

The problem file format and the cost model are the contract in cost-model.md (see
docs/PLANNER.md for the notation). All numbers are SI: bytes, seconds, FLOP/s.

``parse_problem`` / ``load_problem`` validate a problem and raise ``ProblemFieldError``
whose message names the offending field (``layers[3].flops: must be a number >= 0``).
``evaluate(problem, placement)`` recomputes a placement's latency and bottleneck from
the formulas alone and lists every constraint it violates; the solver is tested
against it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import InvalidId, ProblemFieldError
from shared.ids import validate_id
from shared.planning.field_errors import describe, field_path
from shared.planning.precision import (
    LOSS_TOLERANCE,
    ActivationPrecision,
    PrecisionPolicy,
    WeightPrecision,
    activation_bytes,
    weight_bytes,
)

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
Objective = Literal["latency", "throughput"]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Layer(BaseModel):
    """One transformer block: per-token cost and footprint."""

    model_config = _FROZEN
    flops: NonNegative
    weight_bytes: NonNegative
    kv_bytes_per_token: NonNegative = 0.0
    out_bytes: NonNegative
    min_trust: NonNegativeInt = 0
    preferred_trust: NonNegativeInt | None = None  # soft: a preference, not a rule


class Node(BaseModel):
    """A machine that may host one segment. ``memory_bytes`` is free for blocks."""

    model_config = _FROZEN
    id: str
    trust: NonNegativeInt
    memory_bytes: NonNegative
    flops_per_s: Positive
    utilization: NonNegative = 0.0
    # Optional, used only by the migration-cost term (docs/PLANNER.md).
    load_bandwidth_bytes_per_s: Positive | None = None
    shard_load_s_per_byte: NonNegative = 0.0
    # Optional: B decode steps as one forward cost (1 + batch_scaling (B - 1)) x one step
    # (None: not measured, no gain assumed); priced at the problem's expected_batch.
    batch_scaling: NonNegative | None = None

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        try:
            return validate_id(value, "node id")
        except InvalidId as error:
            raise ValueError(str(error)) from None


class Link(BaseModel):
    """A directed link ``src -> dst``."""

    model_config = _FROZEN
    src: str
    dst: str
    bandwidth_bytes_per_s: Positive
    latency_s: NonNegative = 0.0


class Problem(BaseModel):
    """A validated problem. Cross-field rules raise ProblemFieldError naming the field."""

    model_config = _FROZEN
    objective: Objective = "latency"
    source: str
    input_bytes: NonNegative
    # At most 2**53 (exact as floats): the KV term multiplies them with floats.
    context_tokens: Annotated[int, Field(ge=0, le=2**53, strict=True)] = 0
    concurrent_requests: Annotated[int, Field(ge=1, le=2**53, strict=True)] = 1
    source_min_trust: NonNegativeInt = 0  # set by a privacy policy: embedding and head
    # Requests whose decode steps run as one batch (None: 1); see batch_factor.
    expected_batch: Annotated[float, Field(ge=1, le=2**24, allow_inf_nan=False, strict=True)] | None = None
    layers: tuple[Layer, ...] = Field(min_length=1)
    nodes: tuple[Node, ...] = Field(min_length=1)
    links: tuple[Link, ...] = ()
    precision: PrecisionPolicy | None = None  # None: exact (fp32 only), precision.py

    @model_validator(mode="after")
    def _cross_fields(self) -> Problem:
        ids: set[str] = set()
        for index, node in enumerate(self.nodes):
            if node.id in ids:
                raise ProblemFieldError(f"nodes[{index}].id: duplicate node id {node.id!r}")
            ids.add(node.id)
        if self.source not in ids:
            raise ProblemFieldError(f"source: {self.source!r} is not a node id")
        pairs: set[tuple[str, str]] = set()
        for index, link in enumerate(self.links):
            for end in ("src", "dst"):
                if getattr(link, end) not in ids:
                    raise ProblemFieldError(
                        f"links[{index}].{end}: unknown node {getattr(link, end)!r}"
                    )
            if link.src == link.dst:
                raise ProblemFieldError(f"links[{index}].dst: same node as src {link.src!r}")
            if (link.src, link.dst) in pairs:
                raise ProblemFieldError(
                    f"links[{index}]: duplicate link {link.src!r} -> {link.dst!r}"
                )
            pairs.add((link.src, link.dst))
        return self

    def node(self, node_id: str) -> Node:
        """The node with this id (KeyError if absent)."""
        return self.node_index()[node_id]

    def node_index(self) -> dict[str, Node]:
        return {node.id: node for node in self.nodes}

    def link_index(self) -> dict[tuple[str, str], Link]:
        return {(link.src, link.dst): link for link in self.links}

    @property
    def policy(self) -> PrecisionPolicy:
        """The precision policy (the exact one when the problem names none)."""
        return self.precision or PrecisionPolicy.exact()


class PlacedSegment(BaseModel):
    """Layers ``[start, end)`` on one node (the wire's `shared.messages.Segment` is the
    validated form a signed plan carries; this one may be empty or out of range, so the
    evaluator can report such a placement instead of refusing to build it)."""

    model_config = _FROZEN
    node: str
    start: NonNegativeInt
    end: NonNegativeInt
    weights: WeightPrecision = "fp32"  # the precision its blocks are held at
    activations: ActivationPrecision = "fp32"  # of the frames entering it


class Placement(BaseModel):
    """The solver's answer: segments in pipeline order, nothing more (the signed,
    epoch-numbered plan the system runs is the wire's `shared.messages.Plan`)."""

    model_config = _FROZEN
    segments: tuple[PlacedSegment, ...]
    return_activations: ActivationPrecision = "fp32"  # of the frames back to the source

    @classmethod
    def of(cls, *triples: tuple[str, int, int]) -> Placement:
        """``Placement.of(("car", 0, 1), ("rsu", 1, 8))``."""
        return cls(segments=tuple(PlacedSegment(node=n, start=s, end=e) for n, s, e in triples))


class Predicted(BaseModel):
    model_config = _FROZEN
    latency_s: float
    bottleneck_s: float


class Evaluation(BaseModel):
    """A plan's costs recomputed from the formulas, and every violated constraint."""

    model_config = _FROZEN
    latency_s: float
    bottleneck_s: float
    violations: tuple[str, ...]

    @property
    def feasible(self) -> bool:
        return not self.violations


# --- parsing ------------------------------------------------------------------------


def parse_problem(data: Any) -> Problem:
    """Validate decoded JSON into a Problem.

    Raises:
        ProblemFieldError: naming the first offending field, e.g. ``layers[3].flops``.
    """
    if not isinstance(data, dict):
        raise ProblemFieldError("problem: must be a JSON object")
    try:
        return Problem.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        more = error.error_count() - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise ProblemFieldError(
            f"{field_path(tuple(first['loc']))}: {describe(dict(first))}{suffix}"
        ) from None


def load_problem(path: str | Path) -> Problem:
    """Read and validate a problem file.

    Raises:
        ProblemFieldError: the file is missing or unreadable, is not JSON (nesting too
            deep and integers too long to convert included), or a field is invalid (the
            message names it).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProblemFieldError(f"problem file {str(path)!r}: not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ProblemFieldError(f"problem file {str(path)!r}: cannot read ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProblemFieldError(
            f"problem file {str(path)!r}: not valid JSON (line {error.lineno}, "
            f"column {error.colno}: {error.msg})"
        ) from None
    except RecursionError:
        raise ProblemFieldError(
            f"problem file {str(path)!r}: not valid JSON (arrays or objects nest too deeply)"
        ) from None
    except ValueError as error:  # an integer of 4,300+ digits (Python's conversion limit)
        raise ProblemFieldError(f"problem file {str(path)!r}: not valid JSON ({error})") from None
    return parse_problem(data)


# --- the cost formulas, shared by the evaluator and the solver's tables -------------


def total(values: Iterable[float]) -> float:
    """``math.fsum(values)``, but ``inf`` where the exact sum overflows a float (fsum
    raises OverflowError there: two finite terms of 1e308 are a valid problem's)."""
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


def layer_memory_bytes(problem: Problem, layer: Layer, weights: str = "fp32") -> float:
    """Bytes one layer needs on its host: weights (held at ``weights``) + KV cache for
    the context."""
    kv = layer.kv_bytes_per_token * problem.context_tokens * problem.concurrent_requests
    return weight_bytes(layer.weight_bytes, weights) + kv


def effective_flops_per_s(node: Node) -> float:
    """FLOP/s left for our layers; <= 0 means the node cannot host layers."""
    return node.flops_per_s * (1.0 - node.utilization)


def batch_factor(problem: Problem, node: Node) -> float | None:
    """Each request's share of a batched decode step, as a multiple of one lone step:
    ``(1 + s (B - 1)) / B`` for B = ``expected_batch`` and s = the node's
    ``batch_scaling``; None (the contract's compute, unscaled) when B is 1 or s is not
    measured (s = 1, no gain, gives exactly 1 too)."""
    batch, scaling = problem.expected_batch, node.batch_scaling
    if batch is None or batch == 1 or scaling is None:
        return None
    return (1.0 + scaling * (batch - 1.0)) / batch


def compute_s(problem: Problem, node: Node, flops: float) -> float:
    """Seconds per token of ``flops`` on ``node`` for one request (its share of the batch,
    ``batch_factor``); inf when the node cannot compute."""
    speed = effective_flops_per_s(node)
    if speed <= 0:
        return math.inf
    factor = batch_factor(problem, node)
    return flops / speed if factor is None else flops / speed * factor


def boundary_bytes(problem: Problem, boundary: int, precision: str = "fp32") -> float:
    """Bytes crossing the hop before layer ``boundary`` (``L`` = the return hop), with
    the activation at ``precision``."""
    fp32 = problem.input_bytes if boundary == 0 else problem.layers[boundary - 1].out_bytes
    return activation_bytes(fp32, precision)


def transfer_s(link: Link, num_bytes: float) -> float:
    return link.latency_s + num_bytes / link.bandwidth_bytes_per_s


# --- the evaluator ------------------------------------------------------------------


def _coverage_violations(placement: Placement, num_layers: int) -> list[str]:
    violations: list[str] = []
    if not placement.segments:
        return ["coverage: the plan has no segments"]
    expected = 0
    for index, seg in enumerate(placement.segments):
        if seg.start != expected:
            violations.append(f"coverage: segments[{index}] starts at {seg.start}, not {expected}")
        if seg.end <= seg.start:
            violations.append(f"coverage: segments[{index}] [{seg.start}, {seg.end}) is empty")
        expected = seg.end
    if expected != num_layers:
        violations.append(f"coverage: the plan ends at layer {expected}, not {num_layers}")
    return violations


def _segment_terms(problem: Problem, index: int, seg: PlacedSegment) -> tuple[float, list[str]]:
    """The segment's compute time (inf when it cannot run) and its violations."""
    nodes = problem.node_index()
    node = nodes.get(seg.node)
    if node is None:
        return math.inf, [f"segments[{index}].node: unknown node {seg.node!r}"]
    layers = problem.layers[seg.start : min(seg.end, len(problem.layers))]
    violations: list[str] = []
    if node.utilization >= 1:
        violations.append(f"utilization: {seg.node!r} is at {node.utilization:g} and hosts nothing")
    need = total(layer_memory_bytes(problem, layer, seg.weights) for layer in layers)
    if need > node.memory_bytes:
        violations.append(
            f"memory: segments[{index}] needs {need:.0f} bytes, {seg.node!r} has "
            f"{node.memory_bytes:.0f}"
        )
    for offset, layer in enumerate(layers):
        if node.trust < layer.min_trust:
            violations.append(
                f"trust: layer {seg.start + offset} needs trust >= {layer.min_trust}, "
                f"{seg.node!r} has {node.trust}"
            )
    return compute_s(problem, node, total(layer.flops for layer in layers)), violations


def _hop_term(
    problem: Problem, src: str, dst: str, boundary: int, precision: str = "fp32"
) -> tuple[float, list[str]]:
    if src == dst:
        return 0.0, []
    link = problem.link_index().get((src, dst))
    if link is None:
        return math.inf, [f"links: no link {src!r} -> {dst!r} (hop before layer {boundary})"]
    return transfer_s(link, boundary_bytes(problem, boundary, precision)), []


def _precision_violations(problem: Problem, placement: Placement) -> list[str]:
    """Precisions the policy does not allow, and a plan loss over its quality budget."""
    policy, violations = problem.policy, []
    previous, losses, weight_losses = problem.source, [], [0.0]
    hops = [(seg.node, seg.activations) for seg in placement.segments]
    for index, (node, precision) in enumerate(hops + [(problem.source, placement.return_activations)]):
        if precision != "fp32" and precision not in policy.activations:
            violations.append(f"precision: hop {index} carries {precision} activations, "
                              f"the policy allows {list(policy.activations)}")  # fmt: skip
        if node != previous:
            losses.append(policy.activation_loss_of(precision))
        previous = node
    for index, seg in enumerate(placement.segments):
        if seg.weights != "fp32" and seg.weights not in policy.weights:
            violations.append(f"precision: segments[{index}] holds {seg.weights} weights, "
                              f"the policy allows {list(policy.weights)}")  # fmt: skip
        weight_losses.append(policy.weight_loss_of(seg.weights))
    loss = max(weight_losses) + total(losses)
    if loss > policy.quality_budget + LOSS_TOLERANCE:
        violations.append(f"precision: the plan's quality loss {loss:.6g} is over the "
                          f"budget {policy.quality_budget:.6g}")  # fmt: skip
    return violations


def evaluate(problem: Problem, placement: Placement) -> Evaluation:
    """Recompute a placement's predicted costs and list every violated constraint.

    Latency is the correctly rounded sum (``math.fsum``) of all compute and hop terms;
    the bottleneck is their maximum. Terms that cannot be computed are ``inf``.
    """
    num_layers = len(problem.layers)
    violations = _coverage_violations(placement, num_layers)
    source = problem.node_index()[problem.source]
    if source.trust < problem.source_min_trust:
        violations.append(
            f"trust: source {problem.source!r} has trust {source.trust}, the embedding and "
            f"head need >= {problem.source_min_trust}"
        )
    seen: set[str] = set()
    terms: list[float] = []
    previous = problem.source
    for index, seg in enumerate(placement.segments):
        if seg.node in seen:
            violations.append(f"nodes: {seg.node!r} hosts more than one segment")
        seen.add(seg.node)
        hop, hop_violations = _hop_term(problem, previous, seg.node, min(seg.start, num_layers),
                                        seg.activations)  # fmt: skip
        compute, seg_violations = _segment_terms(problem, index, seg)
        terms += [hop, compute]
        violations += hop_violations + seg_violations
        previous = seg.node
    if placement.segments:
        hop, hop_violations = _hop_term(problem, previous, problem.source, num_layers,
                                        placement.return_activations)  # fmt: skip
        terms.append(hop)
        violations += hop_violations
    violations += _precision_violations(problem, placement)
    latency = total(terms) if all(math.isfinite(t) for t in terms) else math.inf
    return Evaluation(
        latency_s=latency, bottleneck_s=max(terms, default=math.inf), violations=tuple(violations)
    )
