"""Node status and telemetry (workers -> monitor)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shared.ids import NodeIdField, TopicId
from shared.messages.base import (
    Epoch,
    Message,
    NonNegativeFloat,
    NonNegativeInt,
    Part,
    Segment,
    ShortText,
)

# --- nodes ------------------------------------------------------------------------------


class NodeStatus(Message):
    """Retained birth message (state online) and Last Will (state offline) of a node."""

    node: NodeIdField
    state: Literal["online", "offline"]
    trust: NonNegativeInt
    """Trust level; a layer may run on a node only if trust >= the layer's min_trust."""
    memory_bytes: NonNegativeInt
    threads: Annotated[int, Field(ge=1)]
    device: ShortText = "cpu"
    capabilities: tuple[ShortText, ...] = Field(default=(), max_length=64)
    """Architectures the node can run, e.g. ("llama", "bert")."""
    epoch: Epoch | None = None
    """The plan epoch the node serves (None before its first plan)."""
    segments: tuple[Segment, ...] = Field(default=(), max_length=64)
    """Blocks the node holds in that epoch."""
    entry: bool = False
    """True when the node is that epoch's entry."""
    kv_budget_bytes: NonNegativeInt | None = None
    """The KV cache bytes the node takes in that epoch (None: not announced, unlimited)."""
    refused: dict[TopicId, NonNegativeInt] = Field(default={}, max_length=64)
    """Control messages this node refused, by ``{Kind}_{why}`` (unsigned, forged, role,
    replayed, stale, private): shared/security/signing.py; and ``Session_takenover``, its
    broker sessions another connection of its identity took over (shared/connection.py)."""
    frame_public_key: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    """The node's X25519 public key (hex): its peers seal frames for it, and check its
    frames, with the pair key of the two nodes (shared/security/frame_keys.py `PeerKeys`).
    Only the node's own identity may publish its status on the secure profile."""


class ServiceStatus(Message):
    """Retained by a control service (broadcaster, orchestrator, monitor): the control
    messages it refused, so `edgesplit status` shows them (shared/security/signing.py)."""

    service: TopicId
    at_s: NonNegativeFloat
    """Unix time of this report."""
    refused: dict[TopicId, NonNegativeInt] = Field(default={}, max_length=64)
    """By ``{Kind}_{why}``, e.g. ``RolloutRequested_forged``; ``Session_takenover`` too."""


class BlockTimes(Part):
    """Measured compute time of one block on a node (smoothed; emulated slowdown included)."""

    decode_s_per_block: NonNegativeFloat | None = None
    """One decode step (one token) through one block, seconds."""
    prefill_s_per_block_token: NonNegativeFloat | None = None
    """A prefill through one block, seconds per prompt token."""
    decode_samples: NonNegativeInt = 0
    prefill_samples: NonNegativeInt = 0
    """Real forwards measured in the window (0: the values come from earlier windows or the benchmark)."""
    source: Literal["benchmark", "forwards"] = "benchmark"
    decode_batch_scaling: NonNegativeFloat | None = None
    """How a batched decode step scales: B requests' steps as one forward take
    ``decode_s_per_block * (1 + decode_batch_scaling * (B - 1))`` per block (1: no gain
    over B steps one at a time; 0: extra rows are free). None: no batched step measured."""
    batched_samples: NonNegativeInt = 0
    """Batched decode steps (two or more requests) measured in the window."""


class LinkObservation(Part):
    """One node's measurements of its link to ``peer`` over one telemetry window."""

    peer: NodeIdField
    rtt_s: NonNegativeFloat | None = None
    """Median round trip of small probes (this node -> peer -> this node), seconds."""
    bandwidth_bytes_per_s: NonNegativeFloat | None = None
    """Outbound (this node -> peer) bandwidth from the dispersion of a sized probe pair."""
    probes_sent: NonNegativeInt = 0
    probes_lost: NonNegativeInt = 0
    probe_bytes: NonNegativeInt = 0
    """Bytes of probe frames this node sent to ``peer`` in the window (echoes included)."""
    inbound_bandwidth_bytes_per_s: NonNegativeFloat | None = None
    """Passive estimate of peer -> this node from timed activation frames."""
    inbound_samples: NonNegativeInt = 0
    delivery_bandwidth_bytes_per_s: NonNegativeFloat | None = None
    """Outbound rate while frames queued for the link (this node's egress delivery rate);
    None when nothing queued in the window. Preferred over the probes: it is measured on
    the traffic itself, every window, where a probe echo may wait behind that traffic."""
    bandwidth_samples: NonNegativeInt = 0
    """Probe pairs behind ``bandwidth_bytes_per_s`` (its median) in this window."""
    bandwidth_high_bytes_per_s: NonNegativeFloat | None = None
    """The largest of those pairs: with two or more, every pair of the window measured
    at most this (a fall they agree on, which the monitor plans with at once)."""
    rtt_samples: NonNegativeInt = 0
    """Small probes behind ``rtt_s`` (their median) in this window."""
    rtt_low_s: NonNegativeFloat | None = None
    """The smallest of those round trips: with two or more, a rise they agree on."""


class Telemetry(Message):
    """A node's periodic load report (QoS 0; the newest one wins)."""

    node: NodeIdField
    window_s: Annotated[float, Field(gt=0)]
    cpu_utilisation: Annotated[float, Field(ge=0, le=1)]
    memory_used_bytes: NonNegativeInt
    requests_in_flight: NonNegativeInt
    requests_queued: NonNegativeInt = 0
    """Requests waiting at the entry for a slot (its admission queue; 0 on other nodes)."""
    ms_per_layer: NonNegativeFloat | None = None
    link_rtt_ms: dict[TopicId, NonNegativeFloat] = Field(default={}, max_length=1024)
    """Measured round trip to each peer node, by node id."""
    bytes_sent: NonNegativeInt = 0
    bytes_received: NonNegativeInt = 0
    epoch: Epoch | None = None
    # Monitoring (docs/MONITOR.md); optional so that older senders still validate.
    memory_available_bytes: NonNegativeInt | None = None
    """What the OS could still give (MemAvailable), bytes."""
    compute_busy: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Fraction of the window the compute thread was busy (emulated slowdown included)."""
    queue_depth: NonNegativeInt = 0
    """Compute jobs waiting for the compute thread at the end of the window."""
    kv_cache_bytes: NonNegativeInt = 0
    """Bytes of K/V cached by the committed segment (tokens held; the planner's input)."""
    segments_held: NonNegativeInt = 0
    blocks_held: NonNegativeInt = 0
    queue_overflows: NonNegativeInt = 0
    """Items its bounded queues refused or dropped since it started (docs/ARCHITECTURE.md)."""
    block_times: BlockTimes | None = None
    links: tuple[LinkObservation, ...] = Field(default=(), max_length=1024)
    frames_forged: NonNegativeInt = 0
    """Data-plane frames dropped since the node started because they did not authenticate
    (a missing or bad MAC, or a sender the plan does not name for that hop)."""
    decode_batches: NonNegativeInt = 0
    """Batched forwards of two or more requests' decode steps since the node started
    (continuous batching: services/worker/batching.py)."""
    decode_batched_steps: NonNegativeInt = 0
    """Decode steps those batched forwards carried (over ``decode_batches``: mean batch)."""
    batched_frames_sent: NonNegativeInt = 0
    """Batch frames (several requests' decode steps in one frame to the next hop,
    services/worker/batch_frames.py) sent since the node started."""
    batched_frames_rows: NonNegativeInt = 0
    """Decode steps those batch frames carried (over ``batched_frames_sent``: mean rows)."""
