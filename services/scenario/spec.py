"""Scenario files (TOML): the parsed, validated form (docs/SCENARIOS.md is the contract).

``services.scenario.spec_load.load_scenario(path)`` reads a file (not re-exported here:
spec_load imports this module, and a package's modules stay free of import cycles). Every
problem is a ``ScenarioError`` whose message is one line naming the key, e.g.
``events[2].at_s: must be >= 0 (got -1)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shared.errors import ConfigError

POLICIES: tuple[str, ...] = ("static", "migrate", "adaptive")
EventKind = Literal["link", "link_trace", "slowdown", "kill", "restart", "join", "leave", "privacy"]
EVENT_KINDS: tuple[str, ...] = ("link", "link_trace", "slowdown", "kill", "restart", "join", "leave",
                                "privacy")  # fmt: skip


class ScenarioError(ConfigError):
    """A scenario file that cannot be run: one line naming the key and the problem."""


@dataclass(frozen=True)
class TracePoint:
    """One row of a link trace CSV: from ``t_s`` after the event's ``at_s`` on."""

    t_s: float
    bandwidth_bytes_per_s: float
    latency_s: float | None = None


@dataclass(frozen=True)
class Event:
    """A timed event. Which fields are set depends on ``kind`` (the others stay None)."""

    at_s: float
    kind: EventKind
    node: str | None = None  # slowdown, kill, restart, join, leave
    src: str | None = None  # link, link_trace
    dst: str | None = None
    bandwidth_bytes_per_s: float | None = None  # link
    latency_s: float | None = None  # link
    one_way: bool = False  # link, link_trace
    trace: tuple[TracePoint, ...] = ()  # link_trace (read from its CSV file)
    factor: float | None = None  # slowdown
    private_blocks: int | None = None  # privacy
    trusted_level: int | None = None  # privacy

    def describe(self) -> str:
        """One short line for progress output and the report's timeline."""
        if self.kind == "link":
            return (f"link {self.src}->{self.dst}{'' if self.one_way else ' (both ways)'}: "
                    f"{(self.bandwidth_bytes_per_s or 0) / 1e3:g} kB/s"
                    + (f" + {self.latency_s * 1e3:g} ms" if self.latency_s is not None else ""))  # fmt: skip
        if self.kind == "link_trace":
            return f"link trace {self.src}->{self.dst}: {len(self.trace)} points"
        if self.kind == "slowdown":
            return f"slowdown {self.node} x{self.factor:g}"
        if self.kind == "privacy":
            return f"privacy: {self.private_blocks} private blocks, trust >= {self.trusted_level}"
        return f"{self.kind} {self.node}"


@dataclass(frozen=True)
class Workload:
    kind: Literal["generate", "embed"]
    arrival: Literal["poisson", "closed"]
    rate_per_s: float | None  # poisson
    concurrency: int | None  # closed
    prompts: tuple[str, ...] = ()  # text prompts, or
    prompt_ids: tuple[tuple[int, ...], ...] = ()  # token-id prompts (exactly one is non-empty)
    max_new_tokens: int = 16


@dataclass(frozen=True)
class Slo:
    """Per-request targets; a request meets the SLO when every set target is met."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None  # embed


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path  # the scenario file (relative paths in it are from its folder)
    topology: Path  # absolute
    model: str  # a packaged model name (smollm2, minilm, tiny-llama, ...) or an absolute folder
    duration_s: float
    seed: int
    workload: Workload
    slo: Slo
    events: tuple[Event, ...] = field(default=())  # sorted by at_s

