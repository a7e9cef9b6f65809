"""The one topic registry: every topic is declared here, once.

A `Topic` binds a pattern under ``edgesplit/{cluster}/`` to its payload, QoS (0 or 1,
never 2), retain flag, connection plane and in-process queue policy. Services pass
`Topic` objects and parameters to the bus; they never format topic strings.

To add a topic: one line at the bottom, e.g.
``LINK_PROBES = Topic("nodes/{node}/probes", LinkProbe, qos=0)``.
Patterns may not overlap (checked at import), so a received topic string names
exactly one `Topic`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from shared.errors import InvalidId
from shared.ids import validate_id
from shared.messages import (
    AbortEpoch,
    CapacityProfile,
    CommitEpoch,
    DecisionRecorded,
    EmbeddingReady,
    EmbedRequest,
    EmulationApplied,
    EmulationCommand,
    EpochLedger,
    EpochReady,
    EpochRejected,
    GenerateRequest,
    LinkDegraded,
    LinkRecovered,
    Message,
    NodeDown,
    NodeJoined,
    NodeOverloadCleared,
    NodeOverloaded,
    NodeStatus,
    Plan,
    PlanProposed,
    PlanRequested,
    PrepareEpoch,
    PrivacyPolicySet,
    ProfileEvent,
    RequestFailed,
    RequestFinished,
    RolloutFinished,
    RolloutRequested,
    ServiceStatus,
    Telemetry,
    TokenGenerated,
)
from shared.tensor_frame import Frame

ROOT = "edgesplit"
_PARAM = re.compile(r"\{([a-z_]+)\}")
_LITERAL = re.compile(r"[A-Za-z0-9_-]+")

P = TypeVar("P")


class Overflow(enum.Enum):
    """What a subscription's bounded queue does when full (each drop is counted and logged)."""

    DROP_OLDEST = "drop_oldest"
    """State-like topics (telemetry, status): the newest value matters."""
    DROP_NEWEST = "drop_newest"
    """Frames and commands: keep what is queued; a drop means flow control failed."""


REGISTRY: dict[str, Topic[Any]] = {}
"""Pattern -> Topic, filled as topics are declared."""


@dataclass(frozen=True, eq=False)
class Topic(Generic[P]):
    """One topic pattern, e.g. ``Topic("nodes/{node}/status", NodeStatus, qos=1, retain=True)``.

    ``payload`` is a Message class, a tuple of them (several kinds on one topic), or
    `Frame` for raw tensor frames on the data connection.
    """

    pattern: str
    payload: type[P] | tuple[type[Message], ...]
    qos: Literal[0, 1] = 0
    retain: bool = False
    plane: Literal["control", "data"] = "control"
    queue_size: int = 1000
    overflow: Overflow = Overflow.DROP_NEWEST
    params: tuple[str, ...] = field(init=False)
    kinds: tuple[type[Message], ...] = field(init=False)
    _levels: tuple[str | None, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        levels: list[str | None] = []
        for level in self.pattern.split("/"):
            name = _PARAM.fullmatch(level)
            if name is None and not _LITERAL.fullmatch(level):
                raise ValueError(f"topic pattern {self.pattern!r}: bad level {level!r}")
            levels.append(None if name else level)
        names = tuple(_PARAM.findall(self.pattern))
        payloads = self.payload if isinstance(self.payload, tuple) else (self.payload,)
        if self.qos not in (0, 1):
            raise ValueError(f"topic {self.pattern!r}: QoS must be 0 or 1, never 2")
        if len(set(names)) != len(names) or "cluster" in names:
            raise ValueError(f"topic {self.pattern!r}: parameter names must be unique")
        if (self.plane == "data") != (payloads == (Frame,)):
            raise ValueError(f"topic {self.pattern!r}: frames travel on data topics only")
        if self.plane == "data" and (self.qos, self.retain) != (0, False):
            raise ValueError(f"topic {self.pattern!r}: data topics are QoS 0 and not retained")
        object.__setattr__(self, "params", names)
        object.__setattr__(self, "kinds", () if self.plane == "data" else payloads)
        object.__setattr__(self, "_levels", tuple(levels))
        _register(self)

    def topic(self, cluster: str, **params: str) -> str:
        """The concrete topic string; every parameter is required and validated (InvalidId)."""
        key = (self.pattern, cluster, *params.items())
        try:
            rendered = _RENDERED.get(key)
        except TypeError:  # an unhashable parameter: validation below refuses it
            rendered = None
        if rendered is None:
            if set(params) != set(self.params):
                raise InvalidId(f"topic {self.pattern!r} needs {self.params}, got {tuple(params)}")
            rendered = self._render(cluster, params)
            _remember(_RENDERED, key, rendered)
        return rendered

    def filter(self, cluster: str, **params: str) -> str:
        """A subscription filter: parameters not given become ``+``."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise InvalidId(f"topic {self.pattern!r} has no parameter(s) {sorted(unknown)}")
        return self._render(cluster, params)

    def _render(self, cluster: str, params: dict[str, str]) -> str:
        values = iter(self.params)
        parts = [ROOT, validate_id(cluster, "cluster id")]
        for level in self._levels:
            if level is not None:
                parts.append(level)
                continue
            name = next(values)
            parts.append(validate_id(params[name], name) if name in params else "+")
        return "/".join(parts)

    def overlaps(self, other: Topic[Any]) -> bool:
        """True when some concrete topic string would match both patterns."""
        return len(self._levels) == len(other._levels) and all(
            a is None or b is None or a == b
            for a, b in zip(self._levels, other._levels, strict=True)
        )

    def parse(self, topic: str) -> tuple[str, dict[str, str]] | None:
        """(cluster, parameters) of a concrete topic of this pattern, or None."""
        parts = topic.split("/")
        if len(parts) != len(self._levels) + 2 or parts[0] != ROOT:
            return None
        params: dict[str, str] = {}
        names = iter(self.params)
        for level, value in zip(self._levels, parts[2:], strict=True):
            if level is None:
                params[next(names)] = value
            elif level != value:
                return None
        return parts[1], params

    def __repr__(self) -> str:
        return f"Topic({self.pattern!r})"


def _register(topic: Topic[Any]) -> None:
    for other in REGISTRY.values():
        if other.overlaps(topic):
            raise ValueError(f"topic {topic.pattern!r} overlaps {other.pattern!r}")
    REGISTRY[topic.pattern] = topic


def match(topic: str) -> tuple[Topic[Any], str, dict[str, str]] | None:
    """The registered Topic of a received topic string, with its cluster and parameters."""
    found = _MATCHED.get(topic, _UNSEEN)
    if found is _UNSEEN:
        found = None
        for candidate in REGISTRY.values():
            parsed = candidate.parse(topic)
            if parsed is not None:
                found = (candidate, parsed[0], parsed[1])
                break
        _remember(_MATCHED, topic, found)
    if found is None:
        return None
    hit: tuple[Topic[Any], str, dict[str, str]] = found  # type: ignore[assignment]
    return hit[0], hit[1], dict(hit[2])


# Hot-path caches: a node sends and receives on a handful of topics, so each topic string
# is parsed and each rendering validated once (bounded: cleared when full).
_CACHE_SIZE = 4096
_UNSEEN = object()
_MATCHED: dict[str, object] = {}
_RENDERED: dict[tuple[object, ...], str] = {}


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_SIZE:
        cache.clear()
    cache[key] = value


# --- the registry ---------------------------------------------------------------------------
# nodes
# control services' refusal counters (retained; `edgesplit status`)
SERVICE_STATUS = Topic("services/{service}/status", ServiceStatus, qos=1, retain=True,
                       overflow=Overflow.DROP_OLDEST)  # fmt: skip
NODE_STATUS = Topic("nodes/{node}/status", NodeStatus, qos=1, retain=True,
                    overflow=Overflow.DROP_OLDEST)  # fmt: skip
TELEMETRY = Topic(
    "nodes/{node}/telemetry", Telemetry, queue_size=256, overflow=Overflow.DROP_OLDEST
)
# plans and the epoch protocol (broadcaster -> workers -> broadcaster)
PLAN = Topic("plan/current", Plan, qos=1, retain=True, overflow=Overflow.DROP_OLDEST)
EPOCH_COMMANDS: Topic[PrepareEpoch | CommitEpoch | AbortEpoch] = Topic(
    "epoch/commands", (PrepareEpoch, CommitEpoch, AbortEpoch), qos=1
)
EPOCH_ACKS: Topic[EpochReady | EpochRejected] = Topic(
    "epoch/acks/{node}", (EpochReady, EpochRejected), qos=1
)
# requests to an entry node and replies to a client
REQUESTS: Topic[GenerateRequest | EmbedRequest] = Topic(
    "nodes/{node}/requests", (GenerateRequest, EmbedRequest), qos=1
)
REPLIES: Topic[TokenGenerated | RequestFinished | EmbeddingReady | RequestFailed] = Topic(
    "clients/{client}/replies", (TokenGenerated, RequestFinished, EmbeddingReady, RequestFailed),
    qos=1, queue_size=10_000,
)  # fmt: skip
# every finished generation once more, for the orchestrator's time-per-token calibration
# (it need not read every client's token stream)
FINISHED = Topic("requests/finished", RequestFinished, qos=1, queue_size=1024)
# monitor and orchestrator
CAPACITY = Topic("monitor/capacity", CapacityProfile, qos=1, retain=True,
                 overflow=Overflow.DROP_OLDEST)  # fmt: skip
PROFILE_EVENTS: Topic[
    NodeJoined | NodeDown | NodeOverloaded | NodeOverloadCleared | LinkDegraded | LinkRecovered
    | ProfileEvent
] = Topic(
    "monitor/events",
    (NodeJoined, NodeDown, NodeOverloaded, NodeOverloadCleared, LinkDegraded, LinkRecovered,
     ProfileEvent),
    qos=1,
)  # fmt: skip
# run-time emulation of a node's compute speed and egress links (docs/MONITOR.md)
EMULATION = Topic("nodes/{node}/emulation", EmulationCommand, qos=1)
EMULATION_STATE = Topic("nodes/{node}/emulation_state", EmulationApplied, qos=1, retain=True,
                        overflow=Overflow.DROP_OLDEST)  # fmt: skip
# the last DECISION_SLOTS decisions stay retained: slot = decision_id % DECISION_SLOTS
DECISION_SLOTS = 16
DECISIONS = Topic("orchestrator/decisions/{slot}", DecisionRecorded, qos=1, retain=True)
# the privacy policy in force (retained; a change makes the orchestrator re-plan at once)
POLICY = Topic("policy/privacy", PrivacyPolicySet, qos=1, retain=True, overflow=Overflow.DROP_OLDEST)
# split reviser: plan requests in, proposals out to the requester's reply topic
REVISER_REQUESTS = Topic("reviser/requests", PlanRequested, qos=1, queue_size=64)
REVISER_REPLIES = Topic("reviser/replies/{client}", PlanProposed, qos=1)
# broadcaster: rollouts in (from the orchestrator), results out
ROLLOUTS = Topic("broadcaster/rollouts", RolloutRequested, qos=1, queue_size=64)
ROLLOUT_RESULTS = Topic("broadcaster/results", RolloutFinished, qos=1)
ROLLOUT_LEDGER = Topic("broadcaster/ledger", EpochLedger, qos=1, retain=True,
                       overflow=Overflow.DROP_OLDEST)  # fmt: skip
# data plane: activation frames into a node (QoS 0; the entry node's replay recovers losses)
ACTIVATIONS = Topic("nodes/{node}/activations", Frame, plane="data", queue_size=1024)
