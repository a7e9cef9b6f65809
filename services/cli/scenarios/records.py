"""What one policy run measured: the runner fills these, the report reads them.

All times are seconds from the start of the policy's measured run (the first request),
except where a name says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["completed", "failed", "lost"]


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    prompt_index: int
    sent_at_s: float
    outcome: Outcome
    first_token_at_s: float | None = None  # generate: first token; embed: the embedding
    finished_at_s: float | None = None  # the terminal answer (completed or failed)
    token_times_s: tuple[float, ...] = ()  # arrival of each generated token (generate)
    tokens: tuple[int, ...] = ()  # generated token ids (generate)
    error: str | None = None  # the typed failure's error code (failed)
    mismatched: bool = False  # completed, but differs from the unsplit reference
    agreement: float | None = None  # completed: analysis.agreement with the reference

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than 2 tokens)."""
        if len(self.token_times_s) < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (len(self.token_times_s) - 1)

    @property
    def ttft_s(self) -> float | None:
        """From sending to the first token (embed: to the embedding); None without one."""
        return None if self.first_token_at_s is None else self.first_token_at_s - self.sent_at_s

    @property
    def latency_s(self) -> float | None:
        """From sending to the terminal answer; None without one (lost)."""
        return None if self.finished_at_s is None else self.finished_at_s - self.sent_at_s

    @property
    def generated_tokens(self) -> int:
        """Tokens generated (the ids when recorded, else the token arrivals)."""
        return len(self.tokens) or len(self.token_times_s)


@dataclass(frozen=True)
class Replan:
    """A committed plan change (the first plan is not a re-plan)."""

    at_s: float  # commit
    kind: Literal["migrate", "resplit"]
    trigger: str  # the orchestrator's trigger (e.g. "link_degraded", "node_down")
    reaction_s: float | None  # from the scenario event that caused it to the commit (None: none)
    stall_ms: float  # the longest gap between two tokens of one request across the switch
    bytes_moved: int  # shard bytes the newly placed segments had to load
    epoch: int
    layout: str  # e.g. "car[0,2) rsu[2,30)", "car[0,2) rsu[2,6) (int8 into 2, int8 into 6)"
    predicted_tpot_s: float | None = None
    realised_tpot_s: float | None = None
    cause: str | None = None  # the event's description


@dataclass(frozen=True)
class EventRecord:
    at_s: float  # when the runner applied it
    kind: str
    description: str
    error: str | None = None  # applying it failed (e.g. a node that is not running)


@dataclass(frozen=True)
class Placement:
    """From ``at_s`` on, ``node`` ran blocks [start, end) (until the next placement of it)."""

    at_s: float
    node: str
    start: int
    end: int
    epoch: int


@dataclass(frozen=True)
class UtilisationSample:
    at_s: float
    node: str
    busy: float  # fraction of the sample's window the node's compute was busy, 0..1


@dataclass(frozen=True)
class PolicyRun:
    policy: str
    duration_s: float  # measured wall time of the run (may be shorter after Ctrl-C)
    nodes: tuple[str, ...]
    requests: tuple[RequestRecord, ...] = ()
    replans: tuple[Replan, ...] = ()
    events: tuple[EventRecord, ...] = ()
    placements: tuple[Placement, ...] = ()  # every plan in force, first plan included
    utilisation: tuple[UtilisationSample, ...] = ()
    privacy_violations: int = 0
    interrupted: bool = False  # stopped by Ctrl-C before duration_s
    notes: tuple[str, ...] = field(default=())  # anything the reader should know

    def all_nodes(self) -> tuple[str, ...]:
        """``nodes`` then, sorted, any other node seen in placements or utilisation samples."""
        seen = {p.node for p in self.placements} | {s.node for s in self.utilisation}
        return self.nodes + tuple(sorted(seen - set(self.nodes)))

    def mean_utilisation(self) -> dict[str, float]:
        """Mean busy fraction per node over its samples (0.0 for a node with none)."""
        busy: dict[str, list[float]] = {node: [] for node in self.all_nodes()}
        for sample in self.utilisation:
            busy[sample.node].append(sample.busy)
        return {node: math.fsum(values) / len(values) if values else 0.0
                for node, values in busy.items()}  # fmt: skip
