"""The data plane's typed failures (services/worker/dataplane.py, handoff.py)."""

from __future__ import annotations

from shared.errors import EdgesplitError, StageTimedOut


class NodeLost(StageTimedOut):
    """A node on a pass's pipeline went down while the pass waited for it."""


class NoPlan(StageTimedOut):
    """A node went down and the orchestrator found no feasible plan without it (no
    capacity, no trusted node): the reason is the orchestrator's."""


class FrameRefused(EdgesplitError):
    """A frame this worker will not act on (bad target, shape or position)."""


class FrameForged(FrameRefused):
    """A frame that does not authenticate: no MAC or a wrong one under its epoch's key, or
    a ``src`` that is not the node the epoch's plan names as the sender of that hop."""
