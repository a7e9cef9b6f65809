"""Pure routing over a plan: which node runs which blocks, and where a frame goes next.

A frame's ``target`` is the first block still to run; ``target == num_layers`` means
the final hidden state, which goes back to the entry node for the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import InvalidPlan
from shared.messages import Plan


@dataclass(frozen=True, slots=True)
class Route:
    """One node's view of a plan."""

    epoch: int
    entry: str
    num_layers: int
    segments: tuple[tuple[str, int, int], ...]  # (node, start, end) in pipeline order
    precisions: tuple[tuple[int, str], ...] = ()  # (target block, activation precision)

    def segment_of(self, node: str) -> tuple[int, int] | None:
        """[start, end) that ``node`` runs, or None."""
        for owner, start, end in self.segments:
            if owner == node:
                return start, end
        return None

    def node_for(self, target: int) -> str:
        """The node that must receive a frame whose next block is ``target``."""
        if target == self.num_layers:
            return self.entry
        for owner, start, _ in self.segments:
            if start == target:
                return owner
        raise InvalidPlan(f"epoch {self.epoch}: no segment starts at block {target}")

    def activations_for(self, target: int) -> str | None:
        """The activation precision the plan names for frames entering block ``target``
        (None: the plan names none for that hop)."""
        return next((precision for block, precision in self.precisions if block == target), None)

    def owner_of_block(self, block: int) -> str:
        """The node that runs ``block``."""
        for owner, start, end in self.segments:
            if start <= block < end:
                return owner
        raise InvalidPlan(f"epoch {self.epoch}: no segment holds block {block}")

    def nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.entry, *(node for node, _, _ in self.segments)]))


def route_of(plan: Plan, num_layers: int) -> Route:
    """Validate ``plan`` against a model of ``num_layers`` blocks and build its Route.

    Raises InvalidPlan when the segments do not cover [0, num_layers) contiguously in
    order, or a node appears twice.
    """
    expected = 0
    seen: set[str] = set()
    for segment in plan.segments:
        if segment.start != expected:
            raise InvalidPlan(
                f"epoch {plan.epoch}: segment on {segment.node} starts at {segment.start}, "
                f"expected {expected}"
            )
        if segment.node in seen:
            raise InvalidPlan(f"epoch {plan.epoch}: node {segment.node} holds two segments")
        seen.add(segment.node)
        expected = segment.end
    if expected != num_layers:
        raise InvalidPlan(
            f"epoch {plan.epoch}: segments end at block {expected}; the model has {num_layers}"
        )
    return Route(
        epoch=plan.epoch,
        entry=plan.entry_node,
        num_layers=num_layers,
        segments=tuple((s.node, s.start, s.end) for s in plan.segments),
        precisions=tuple((e.target, e.activations) for e in plan.link_precisions),
    )
