"""The capacity profile, monitor events and run-time emulation commands."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shared.ids import NodeIdField
from shared.messages.base import (
    Message,
    NonNegativeFloat,
    NonNegativeInt,
    Part,
    ShortText,
    Signature,
)

# --- monitor and orchestrator --------------------------------------------------------------


class NodeCapacity(Part):
    node: NodeIdField
    alive: bool
    trust: NonNegativeInt
    memory_free_bytes: NonNegativeInt
    flops_per_s: NonNegativeFloat
    utilisation: Annotated[float, Field(ge=0, le=1)]
    # Measured by the monitor (docs/MONITOR.md).
    health: Literal["up", "down", "overloaded"] = "up"
    down_reason: ShortText = ""
    memory_bytes: NonNegativeInt = 0
    """The node's memory budget for blocks (its status)."""
    memory_used_bytes: NonNegativeInt = 0
    memory_available_bytes: NonNegativeInt | None = None
    cpu_utilisation: Annotated[float, Field(ge=0, le=1)] = 0.0
    queue_depth: NonNegativeFloat = 0.0
    requests_in_flight: NonNegativeInt = 0
    requests_queued: NonNegativeInt = 0
    """Requests waiting at the entry for a slot (the node's latest telemetry)."""
    kv_cache_bytes: NonNegativeInt = 0
    segments_held: NonNegativeInt = 0
    blocks_held: NonNegativeInt | None = None
    """Blocks the node's latest telemetry says it holds: what ``memory_free_bytes`` already
    subtracted for them (None: an older monitor, which did not say)."""
    queue_overflows: NonNegativeInt = 0
    """Items the node's bounded queues refused or dropped since it started (its telemetry)."""
    decode_s_per_block: NonNegativeFloat | None = None
    prefill_s_per_block_token: NonNegativeFloat | None = None
    compute_source: Literal["none", "benchmark", "forwards"] = "none"
    decode_batch_scaling: NonNegativeFloat | None = None
    """The node's measured batch scaling (its telemetry's ``BlockTimes``): B requests'
    decode steps as one forward take ``decode_s_per_block * (1 + scaling * (B - 1))``
    per block. None: not measured (the planner then assumes no gain from batching)."""
    layer_s_per_token: tuple[NonNegativeFloat, ...] = Field(default=(), max_length=4096)
    """Predicted prefill seconds per token of each manifest block on this node."""
    last_seen_s: NonNegativeFloat = 0.0
    """Unix time of the node's newest telemetry or status."""


class LinkCapacity(Part):
    src: NodeIdField
    dst: NodeIdField
    bandwidth_bytes_per_s: NonNegativeFloat
    latency_s: NonNegativeFloat
    # Measured by the monitor (docs/MONITOR.md); latency_s is rtt_s / 2.
    rtt_s: NonNegativeFloat | None = None
    loss: Annotated[float, Field(ge=0, le=1)] = 0.0
    health: Literal["ok", "degraded", "unknown"] = "unknown"
    degraded: tuple[ShortText, ...] = Field(default=(), max_length=8)
    """The metrics that are degraded ("bandwidth", "rtt", "loss")."""
    bandwidth_source: Literal["probe", "passive", "none"] = "none"
    passive_bandwidth_bytes_per_s: NonNegativeFloat | None = None
    probe_bytes_per_s: NonNegativeFloat = 0.0


class LayerCost(Part):
    """One block's per-token costs from the shard manifest."""

    index: NonNegativeInt
    flops_per_token: NonNegativeFloat
    activation_bytes_per_token: NonNegativeInt
    kv_bytes_per_token: NonNegativeInt
    weight_bytes: NonNegativeInt


class CapacityProfile(Message):
    """The monitor's current view of nodes and links (retained)."""

    as_of_s: NonNegativeFloat
    """Unix time of the newest observation included."""
    nodes: tuple[NodeCapacity, ...] = Field(max_length=1024)
    links: tuple[LinkCapacity, ...] = Field(default=(), max_length=4096)
    model_id: ShortText = ""
    layers: tuple[LayerCost, ...] = Field(default=(), max_length=4096)
    heartbeat_timeout_s: NonNegativeFloat = 0.0
    """A node without telemetry for this long is down."""


class ProfileEvent(Message):
    """Event: the monitor saw a change worth a planning decision."""

    event: Literal["node_joined", "node_lost", "link_changed", "load_changed", "sla_missed"]
    node: NodeIdField | None = None
    detail: ShortText = ""
    emergency: bool = False
    """True skips hysteresis (a node was lost)."""


class Evidence(Part):
    """Why the monitor raised an event: a metric's value before and after, over a window."""

    metric: ShortText
    old_value: float | None = None
    new_value: float | None = None
    threshold: float | None = None
    window_s: NonNegativeFloat = 0.0
    """How long the condition held before the event (persistence), seconds."""
    samples: NonNegativeInt = 0


class NodeJoined(Message):
    """Event: a node is up (first seen, or back after NodeDown)."""

    node: NodeIdField
    at_s: NonNegativeFloat
    reason: Literal["status", "telemetry"]
    evidence: tuple[Evidence, ...] = Field(default=(), max_length=16)
    issued_at_s: NonNegativeFloat = 0.0
    """Unix time this message was published, stamped and signed by the publishing bus:
    receivers refuse one older than ``max_message_age_s`` (docs/SECURITY.md)."""
    signature: Signature = ""


class NodeDown(Message):
    """Event: a node is gone (Last Will / offline status, or missed heartbeats)."""

    node: NodeIdField
    at_s: NonNegativeFloat
    reason: Literal["offline", "heartbeat_timeout"]
    evidence: tuple[Evidence, ...] = Field(default=(), max_length=16)
    emergency: bool = True
    """Skip hysteresis: re-plan around the node now."""
    issued_at_s: NonNegativeFloat = 0.0
    """Unix time this message was published, stamped and signed by the publishing bus:
    receivers refuse one older than ``max_message_age_s`` (docs/SECURITY.md)."""
    signature: Signature = ""


class NodeOverloaded(Message):
    """Event: a node's load stayed above its threshold for the persistence window."""

    node: NodeIdField
    at_s: NonNegativeFloat
    evidence: tuple[Evidence, ...] = Field(default=(), max_length=16)


class NodeOverloadCleared(Message):
    """Event: an overloaded node's load stayed below the release threshold."""

    node: NodeIdField
    at_s: NonNegativeFloat
    evidence: tuple[Evidence, ...] = Field(default=(), max_length=16)


class LinkDegraded(Message):
    """Event: a link's bandwidth, round trip or loss moved past its threshold and stayed."""

    src: NodeIdField
    dst: NodeIdField
    at_s: NonNegativeFloat
    metric: Literal["bandwidth", "rtt", "loss"]
    evidence: tuple[Evidence, ...] = Field(default=(), max_length=16)


class LinkRecovered(Message):
    """Event: a degraded link's metric came back near its baseline and stayed."""

    src: NodeIdField
    dst: NodeIdField
    at_s: NonNegativeFloat
    metric: Literal["bandwidth", "rtt", "loss"]
    evidence: tuple[Evidence, ...] = Field(default=(), max_length=16)


# --- run-time emulation ---------------------------------------------------------------------


class EmulatedLink(Part):
    """Egress shaping toward ``dst``: bandwidth (None: unshaped) and added one-way latency."""

    dst: NodeIdField
    bandwidth_bytes_per_s: Annotated[float, Field(gt=0)] | None = None
    latency_s: Annotated[float, Field(ge=0, le=60)] = 0.0


class EmulationCommand(Message):
    """Command to a worker: change its emulated compute speed and link shaping now.

    Fields left None keep their current value; ``links`` replaces the shape of each
    named destination (``reset_links`` first clears every shape). This is emulation.
    """

    command_id: NonNegativeInt
    slowdown: Annotated[float, Field(ge=1, le=1000)] | None = None
    links: tuple[EmulatedLink, ...] = Field(default=(), max_length=1024)
    reset_links: bool = False
    noise: Annotated[float, Field(ge=0, le=0.5)] | None = None
    """Random +-fraction applied to every shaped link and to the slowdown (re-drawn often)."""
    issued_at_s: NonNegativeFloat = 0.0
    """Unix time this message was published, stamped and signed by the publishing bus:
    receivers refuse one older than ``max_message_age_s`` (docs/SECURITY.md)."""
    signature: Signature = ""


class EmulationApplied(Message):
    """Event (retained): the emulation a worker applies now, after ``command_id``."""

    node: NodeIdField
    command_id: NonNegativeInt
    slowdown: Annotated[float, Field(ge=1)]
    links: tuple[EmulatedLink, ...] = Field(default=(), max_length=1024)
    noise: Annotated[float, Field(ge=0, le=0.5)] = 0.0
