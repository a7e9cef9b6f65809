"""A placement's precisions: chosen under the policy's quality budget, and what they save.

``assign_precisions(problem, placement)`` fills in the precision of each segment's
weights and of each hop's activations for a placement the solver chose (pure):

1. weights: per segment, the most exact usable weight precision whose held bytes fit
   the node (fp32 whenever it fits: a lossy weight precision only buys memory);
2. activations: the quality budget left after the weights' loss is rationed over the
   hops by the seconds per token each saves, most first; a hop takes the usable
   precision that saves the most while its loss still fits (``min_saving_s`` at least,
   else fp32).

The solver's tables price each hop at its best usable precision on its own
(``objectives.hop_precision``), so the search is exact while the budget covers every
lossy hop it wants; where the budget binds, the rationing here decides and
``evaluate`` recomputes the plan's costs with what was assigned.
"""

from __future__ import annotations

import math
from typing import Any

from shared.planning.precision import (
    LOSS_TOLERANCE,
    ActivationPrecision,
    WeightPrecision,
    weight_bytes,
)
from shared.planning.problem import (
    Placement,
    Problem,
    boundary_bytes,
    layer_memory_bytes,
    total,
    transfer_s,
)


def segment_weights(problem: Problem, node: str, start: int, end: int) -> WeightPrecision:
    """The most exact usable weight precision whose blocks ``[start, end)`` fit ``node``
    (fp32 when none fits: the evaluator then reports the memory violation)."""
    memory = problem.node(node).memory_bytes
    for precision in problem.policy.usable_weights():
        need = total(layer_memory_bytes(problem, problem.layers[i], precision) for i in range(start, end))
        if need <= memory:
            return precision
    return "fp32"


def _hops(problem: Problem, placement: Placement) -> list[tuple[int, str, str, int]]:
    """(index, src, dst, boundary) of every hop between two different nodes; index
    ``len(segments)`` is the return hop."""
    hops, previous = [], problem.source
    ends = [(seg.node, seg.start) for seg in placement.segments] + [(problem.source, len(problem.layers))]
    for index, (node, boundary) in enumerate(ends):
        if node != previous:
            hops.append((index, previous, node, boundary))
        previous = node
    return hops


def _options(problem: Problem, src: str, dst: str, boundary: int) -> list[tuple[float, float, str]]:
    """(seconds saved, loss, precision) of each usable lossy precision on a hop that
    saves at least ``min_saving_s``, most saving first."""
    link = problem.link_index().get((src, dst))
    if link is None:
        return []
    policy = problem.policy
    exact_s = transfer_s(link, boundary_bytes(problem, boundary))
    options = []
    for precision in policy.usable_activations()[1:]:
        saved = exact_s - transfer_s(link, boundary_bytes(problem, boundary, precision))
        if saved >= policy.min_saving_s and saved > 0:
            options.append((saved, policy.activation_loss_of(precision), precision))
    return sorted(options, key=lambda option: (-option[0], option[1]))


def assign_precisions(problem: Problem, placement: Placement) -> Placement:
    """``placement`` with each segment's weight precision and each hop's activation
    precision chosen under ``problem``'s policy (module docstring); pure."""
    policy = problem.policy
    segments = [seg.model_copy(update={"weights": segment_weights(problem, seg.node, seg.start, seg.end),
                                       "activations": "fp32"})
                for seg in placement.segments]  # fmt: skip
    left = policy.quality_budget - max([policy.weight_loss_of(s.weights) for s in segments], default=0.0)
    choices: dict[int, ActivationPrecision] = {}
    hops = [(_options(problem, src, dst, boundary), index)
            for index, src, dst, boundary in _hops(problem, placement)]
    hops.sort(key=lambda hop: (-hop[0][0][0] if hop[0] else 0.0, hop[1]))  # most saving first
    for options, index in hops:
        for _, loss, precision in options:
            if loss <= left + LOSS_TOLERANCE:
                choices[index], left = precision, left - loss  # type: ignore[assignment]
                break
    for index, precision in choices.items():
        if index < len(segments):
            segments[index] = segments[index].model_copy(update={"activations": precision})
    return Placement(segments=tuple(segments), return_activations=choices.get(len(segments), "fp32"))


def precision_summary(problem: Problem, placement: Placement) -> dict[str, Any]:
    """What a placement's precisions choose and save (JSON-ready): per hop the precision,
    bytes per token against fp32 and seconds saved per token; per segment the weight
    precision and held weight bytes against fp32; totals and the plan's quality loss."""
    policy, links = problem.policy, problem.link_index()
    precisions = {i: seg.activations for i, seg in enumerate(placement.segments)}
    precisions[len(placement.segments)] = placement.return_activations
    hops, saved_s, losses = [], [], []
    for index, src, dst, boundary in _hops(problem, placement):
        precision, link = precisions[index], links.get((src, dst))
        fp32_bytes, sent = boundary_bytes(problem, boundary), boundary_bytes(problem, boundary, precision)
        saved = (transfer_s(link, fp32_bytes) - transfer_s(link, sent)) if link else math.nan
        hops.append({"src": src, "dst": dst, "before_layer": boundary, "activations": precision,
                     "bytes_per_token": sent, "fp32_bytes_per_token": fp32_bytes, "saved_s": saved})  # fmt: skip
        saved_s.append(saved)
        losses.append(policy.activation_loss_of(precision))
    segments, held, held_fp32 = [], [], []
    for seg in placement.segments:
        fp32 = total(problem.layers[i].weight_bytes for i in range(seg.start, seg.end))
        segments.append({"node": seg.node, "start": seg.start, "end": seg.end, "weights": seg.weights,
                         "weight_bytes": weight_bytes(fp32, seg.weights), "fp32_weight_bytes": fp32})  # fmt: skip
        held.append(weight_bytes(fp32, seg.weights))
        held_fp32.append(fp32)
    loss = max([policy.weight_loss_of(s.weights) for s in placement.segments], default=0.0) + total(losses)
    return {"hops": hops, "segments": segments, "link_saved_s": total(saved_s),
            "memory_saved_bytes": total(held_fp32) - total(held), "quality_loss": loss,
            "quality_budget": policy.quality_budget}  # fmt: skip
