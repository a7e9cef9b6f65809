"""The entry's adaptive deadline for one pipeline pass.

A pass whose frame was lost (a broker restart, a dropped QoS 0 frame) never answers; the
entry notices when the pass deadline passes and replays. A fixed deadline long enough for
the slowest prefill would stall a 20 ms decode step for the whole of it, so the deadline
follows what passes really take: an EWMA model ``seconds = base + per_token * tokens``
fitted to answered passes, times ``factor``, never below ``floor_s`` and never above
``cap_s`` (the configured ``stage_timeout_s``; also the deadline before any pass answered).
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.2
"""Weight of the newest pass in the EWMAs."""


@dataclass
class StageDeadline:
    """Seconds to wait for one pass of ``tokens`` tokens. Units: seconds."""

    cap_s: float
    floor_s: float = 2.0
    factor: float = 10.0
    base_s: float | None = None
    """Smoothed time of a one-token pass (hops, queueing, compute)."""
    per_token_s: float = 0.0
    """Smoothed extra time per token beyond the first (prefill)."""

    def observe(self, tokens: int, seconds: float) -> None:
        """Learn from an answered pass of ``tokens`` tokens that took ``seconds``."""
        if self.base_s is None and tokens > 1:  # the first prefill: assume linear for now
            self.base_s = self.per_token_s = seconds / tokens
            return
        if tokens <= 1 or self.base_s is None:
            self.base_s = seconds if self.base_s is None else self.base_s + ALPHA * (seconds - self.base_s)
            return
        per_token = max(0.0, seconds - self.base_s) / (tokens - 1)
        self.per_token_s += ALPHA * (per_token - self.per_token_s)

    def timeout_s(self, tokens: int) -> float:
        """The deadline for a pass of ``tokens`` tokens."""
        if self.base_s is None:
            return self.cap_s
        expected = self.base_s + self.per_token_s * max(0, tokens - 1)
        return min(self.cap_s, max(self.floor_s, self.factor * expected))
