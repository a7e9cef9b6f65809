"""Which plan epochs a worker can serve: the committed one, prepared ones, draining ones.

Make-before-break: a PREPARE builds a `Serving` for epoch N+1 while epoch N keeps
serving; COMMIT (or the retained plan of N+1) makes it current, and N drains for
``drain_s`` so frames already in flight under N still complete. Anything older is
fenced: its frames are dropped. Pure bookkeeping, no I/O; times are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.planning.route import Route

if TYPE_CHECKING:
    from services.worker.compute import SegmentHost
    from services.worker.entry import EntryRole


@dataclass
class Serving:
    """What a node runs in one epoch."""

    route: Route
    host: SegmentHost | None
    entry: EntryRole | None
    frame_key: bytes
    """The epoch's frame key: what this node's frames of the epoch are authenticated with
    (services/worker/frame_auth.py)."""

    @property
    def epoch(self) -> int:
        return self.route.epoch


@dataclass
class EpochKeeper:
    """Serving states by epoch. ``drain_s``: how long a replaced epoch still serves frames."""

    drain_s: float = 30.0
    current: Serving | None = None
    prepared: dict[int, Serving] = field(default_factory=dict)
    draining: dict[int, tuple[Serving, float]] = field(default_factory=dict)
    highest_seen: int = 0

    @property
    def epoch(self) -> int | None:
        return self.current.epoch if self.current else None

    def is_stale(self, epoch: int) -> bool:
        """True for an epoch not newer than the committed one (nothing to prepare)."""
        return self.current is not None and epoch <= self.current.epoch

    def prepare(self, serving: Serving) -> None:
        if not self.is_stale(serving.epoch):
            self.prepared[serving.epoch] = serving
            self.highest_seen = max(self.highest_seen, serving.epoch)

    def abort(self, epoch: int) -> Serving | None:
        return self.prepared.pop(epoch, None)

    def commit(self, epoch: int, now_s: float) -> Serving | None:
        """Make prepared ``epoch`` current; the old current drains. None if not prepared
        (or already committed)."""
        serving = self.prepared.pop(epoch, None)
        if serving is None or self.is_stale(epoch):
            return None
        if self.current is not None:
            self.draining[self.current.epoch] = (self.current, now_s + self.drain_s)
        self.current = serving
        for stale in [e for e in self.prepared if e <= epoch]:
            del self.prepared[stale]  # an older prepared epoch can never commit now
        return serving

    def for_frame(self, epoch: int, now_s: float) -> Serving | None:
        """The state that serves a frame of ``epoch``, or None when it is fenced."""
        if self.current is not None and epoch == self.current.epoch:
            return self.current
        if epoch in self.prepared:
            # A frame of a prepared epoch proves it was committed elsewhere (the entry only
            # sends under committed epochs); serve it before our own COMMIT arrives.
            return self.prepared[epoch]
        draining = self.draining.get(epoch)
        if draining is not None and now_s < draining[1]:
            return draining[0]
        return None

    def expire(self, now_s: float) -> list[Serving]:
        """Drop draining epochs past their deadline; returns them (their hosts can go)."""
        done = [epoch for epoch, (_, until) in self.draining.items() if now_s >= until]
        return [self.draining.pop(epoch)[0] for epoch in done]

    def hosts(self) -> list[SegmentHost]:
        """Every distinct segment host still referenced."""
        states = [self.current, *self.prepared.values(), *(s for s, _ in self.draining.values())]
        unique: dict[int, SegmentHost] = {}
        for state in states:
            if state is not None and state.host is not None:
                unique[id(state.host)] = state.host
        return list(unique.values())
