"""Control-plane messages: frozen, strict pydantic models carried in the codec's envelope.

Every subclass of `Message` registers itself under its class name (its wire ``kind``).
Events are named in the past tense (`TokenGenerated`), commands in the imperative
(`PrepareEpoch`). To add a message: write the class here and declare the topic that
carries it in shared/topics.py (one line). Tuples, not lists: messages are immutable.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any, ClassVar, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.ids import NodeIdField, RequestIdField, TopicId

# Bounds keep every value encodable (msgpack ints are 64-bit) and under the codec's limits.
_INT_LIMIT = 2**63
Epoch = Annotated[int, Field(ge=0, lt=_INT_LIMIT)]
NonNegativeInt = Annotated[int, Field(ge=0, lt=_INT_LIMIT)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
ShortText = Annotated[str, Field(max_length=1024)]
LongText = Annotated[str, Field(max_length=65_536)]  # <= 256 KiB of UTF-8 (codec limit)
MAX_ITEMS = 65_536  # the codec's max_array_len

MESSAGE_KINDS: dict[str, type[Message]] = {}
"""Wire kind (class name) -> message class; filled as the classes are defined."""


class Message(BaseModel):
    """Base of every control-plane payload. Subclasses register under their class name."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)
    kind: ClassVar[str] = "Message"

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__name__ in MESSAGE_KINDS:
            raise TypeError(f"message kind {cls.__name__} is declared twice")
        cls.kind = cls.__name__
        MESSAGE_KINDS[cls.__name__] = cls


class _Part(BaseModel):
    """A nested value inside a message (not a message of its own)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)


class Segment(_Part):
    """Layers [start, end) of the model, run on ``node``."""

    node: NodeIdField
    start: NonNegativeInt
    end: NonNegativeInt

    @model_validator(mode="after")
    def _non_empty(self) -> Segment:
        if self.end <= self.start:
            raise ValueError(f"segment [{self.start}, {self.end}) on {self.node} is empty")
        return self


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


class BlockTimes(_Part):
    """Measured compute time of one block on a node (smoothed; emulated slowdown included)."""

    decode_s_per_block: NonNegativeFloat | None = None
    """One decode step (one token) through one block, seconds."""
    prefill_s_per_block_token: NonNegativeFloat | None = None
    """A prefill through one block, seconds per prompt token."""
    decode_samples: NonNegativeInt = 0
    prefill_samples: NonNegativeInt = 0
    """Real forwards measured in the window (0: the values come from earlier windows or the benchmark)."""
    source: Literal["benchmark", "forwards"] = "benchmark"


class LinkObservation(_Part):
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


class Telemetry(Message):
    """A node's periodic load report (QoS 0; the newest one wins)."""

    node: NodeIdField
    window_s: Annotated[float, Field(gt=0)]
    cpu_utilisation: Annotated[float, Field(ge=0, le=1)]
    memory_used_bytes: NonNegativeInt
    requests_in_flight: NonNegativeInt
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
    segments_held: NonNegativeInt = 0
    blocks_held: NonNegativeInt = 0
    block_times: BlockTimes | None = None
    links: tuple[LinkObservation, ...] = Field(default=(), max_length=1024)


# --- plans and epochs ---------------------------------------------------------------------


class Plan(Message):
    """A signed placement: segments in pipeline order. Retained on the plan topic."""

    epoch: Epoch
    model_id: ShortText
    entry_node: NodeIdField
    segments: tuple[Segment, ...] = Field(min_length=1, max_length=1024)
    signature: str = ""
    """Hex HMAC-SHA256 of the plan without its signature (see `sign` / `signature_ok`)."""

    def signing_bytes(self) -> bytes:
        """Canonical bytes the signature covers (everything but the signature)."""
        return msgpack.packb(self.model_dump(exclude={"signature"}), use_bin_type=True)

    def sign(self, key: str) -> Plan:
        """This plan with its signature set for ``key``."""
        digest = hmac.new(key.encode(), self.signing_bytes(), hashlib.sha256).hexdigest()
        return self.model_copy(update={"signature": digest})

    def signature_ok(self, key: str) -> bool:
        """True when the plan is signed with ``key`` (constant-time comparison)."""
        expected = hmac.new(key.encode(), self.signing_bytes(), hashlib.sha256).hexdigest()
        return bool(self.signature) and hmac.compare_digest(expected, self.signature)


class PrepareEpoch(Message):
    """Command: load the shards of ``plan`` while still serving the current epoch."""

    epoch: Epoch
    plan: Plan
    ready_timeout_s: Annotated[float, Field(gt=0)] = 30.0


class EpochReady(Message):
    """Event: ``node`` holds its shards for ``epoch`` (READY ack)."""

    epoch: Epoch
    node: NodeIdField


class EpochRejected(Message):
    """Event: ``node`` cannot take ``epoch`` (NACK)."""

    epoch: Epoch
    node: NodeIdField
    reason: ShortText


class CommitEpoch(Message):
    """Command: switch to ``epoch`` at the next token boundary."""

    epoch: Epoch


class AbortEpoch(Message):
    """Command: drop what was prepared for ``epoch``; stay on the current one."""

    epoch: Epoch
    reason: ShortText


# --- requests -------------------------------------------------------------------------------


class GenerateRequest(Message):
    """Command to the entry node: generate up to ``max_new_tokens`` after a prompt.

    Exactly one of ``prompt`` and ``token_ids`` is given. Replies go to the
    client-replies topic of ``reply_to`` (a client id, never a raw topic string).
    """

    request_id: RequestIdField
    reply_to: TopicId
    prompt: LongText | None = None
    token_ids: Annotated[tuple[TokenId, ...], Field(max_length=MAX_ITEMS)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1, le=65536)] = 64
    temperature: NonNegativeFloat = 0.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: NonNegativeInt | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """Deadline for the whole request, counted from its arrival at the entry node."""
    resume_token_ids: Annotated[tuple[TokenId, ...], Field(max_length=MAX_ITEMS)] | None = None
    """A resubmission (the client lost its entry or some replies): the tokens the client
    already has. The entry continues after them (or resends what it has beyond them)."""

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        return self


class EmbedRequest(Message):
    """Command to the entry node of an encoder plan: embed a text (one pass)."""

    request_id: RequestIdField
    reply_to: TopicId
    text: LongText
    normalize: bool = True
    timeout_s: Annotated[float, Field(gt=0)] = 60.0


class TokenGenerated(Message):
    """Event streamed to the client: token number ``index`` (0-based) of a request."""

    request_id: RequestIdField
    index: NonNegativeInt
    token_id: TokenId
    text: ShortText
    """The text this token adds (may be empty for a partial UTF-8 sequence)."""


class RequestFinished(Message):
    """Event: a generation finished; all its tokens and its timings."""

    request_id: RequestIdField
    token_ids: tuple[TokenId, ...] = Field(max_length=MAX_ITEMS)
    text: LongText = ""
    finish_reason: Literal["eos", "length"] = "length"
    ttft_s: NonNegativeFloat
    """Time to first token, from the request's arrival at the entry node."""
    tpot_s: NonNegativeFloat
    """Mean time per output token after the first."""


class EmbeddingReady(Message):
    """Event: the embedding of an EmbedRequest."""

    request_id: RequestIdField
    embedding: tuple[float, ...] = Field(max_length=MAX_ITEMS)
    elapsed_s: NonNegativeFloat


class RequestFailed(Message):
    """Event: a request could not be served; ``error`` is machine-readable."""

    request_id: RequestIdField
    error: Literal["busy", "context_too_long", "timeout", "invalid_request", "internal", "no_plan"]
    message: ShortText


# --- monitor and orchestrator --------------------------------------------------------------


class NodeCapacity(_Part):
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
    kv_cache_bytes: NonNegativeInt = 0
    segments_held: NonNegativeInt = 0
    decode_s_per_block: NonNegativeFloat | None = None
    prefill_s_per_block_token: NonNegativeFloat | None = None
    compute_source: Literal["none", "benchmark", "forwards"] = "none"
    layer_s_per_token: tuple[NonNegativeFloat, ...] = Field(default=(), max_length=4096)
    """Predicted prefill seconds per token of each manifest block on this node."""
    last_seen_s: NonNegativeFloat = 0.0
    """Unix time of the node's newest telemetry or status."""


class LinkCapacity(_Part):
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


class LayerCost(_Part):
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


class Evidence(_Part):
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


class NodeDown(Message):
    """Event: a node is gone (Last Will / offline status, or missed heartbeats)."""

    node: NodeIdField
    at_s: NonNegativeFloat
    reason: Literal["offline", "heartbeat_timeout"]
    evidence: tuple[Evidence, ...] = Field(default=(), max_length=16)
    emergency: bool = True
    """Skip hysteresis: re-plan around the node now."""


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


class EmulatedLink(_Part):
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


class EmulationApplied(Message):
    """Event (retained): the emulation a worker applies now, after ``command_id``."""

    node: NodeIdField
    command_id: NonNegativeInt
    slowdown: Annotated[float, Field(ge=1)]
    links: tuple[EmulatedLink, ...] = Field(default=(), max_length=1024)
    noise: Annotated[float, Field(ge=0, le=0.5)] = 0.0


class Candidate(_Part):
    summary: ShortText
    """Segments as text, e.g. "car-1[0,4) rsu-1[4,30)"."""
    predicted_latency_s: NonNegativeFloat
    """Predicted time per output token on the profile of the decision (0 when infeasible)."""
    migration_cost_s: NonNegativeFloat = 0.0
    # The orchestrator's view of the candidate (docs/ORCHESTRATOR.md).
    kind: Literal["current", "migrate", "resplit"] = "resplit"
    origin: Literal["running", "reviser", "migration"] = "reviser"
    segments: tuple[Segment, ...] = Field(default=(), max_length=1024)
    bottleneck_s: NonNegativeFloat = 0.0
    feasible: bool = True
    predicted_gain_s: float = 0.0
    """Time saved over the horizon against the running plan, seconds."""
    note: ShortText = ""
    """Why it was (not) eligible: threshold, cost, a violated constraint."""


class DecisionRecorded(Message):
    """Event: what the orchestrator decided and why (retained; shown by `status`).

    Published when decided (``outcome`` "none" for keep, "pending" for a rollout), again
    when the rollout ended ("committed" / "aborted" / "failed"), and once more with the
    realised effect (``realised_tpot_s``) after the observation window.
    """

    decision_id: NonNegativeInt
    trigger: ShortText
    candidates: tuple[Candidate, ...] = Field(default=(), max_length=256)
    action: Literal["keep", "migrate", "resplit"]
    predicted_gain_s: float = 0.0
    """Predicted time saved over the horizon by the chosen plan, seconds (before cost)."""
    from_epoch: Epoch | None = None
    to_epoch: Epoch | None = None
    realised_gain_s: float | None = None
    """(baseline_tpot_s - realised_tpot_s) x horizon_tokens: the saving that happened."""
    # Evidence, prediction and outcome (docs/ORCHESTRATOR.md).
    at_s: NonNegativeFloat = 0.0
    """Unix time of the decision."""
    evidence: tuple[Evidence, ...] = Field(default=(), max_length=16)
    trigger_detail: ShortText = ""
    emergency: bool = False
    """True when a hard constraint was violated: threshold and dwell were skipped."""
    reason: ShortText = ""
    chosen: NonNegativeInt | None = None
    """Index of the chosen plan in ``candidates`` (None: keep)."""
    current_latency_s: NonNegativeFloat | None = None
    """The running plan's predicted time per token on this profile (None: none or infeasible)."""
    predicted_latency_s: NonNegativeFloat | None = None
    """The chosen plan's predicted time per token."""
    predicted_cost_s: NonNegativeFloat = 0.0
    """One-off migration cost of the chosen plan plus the switch overhead, seconds."""
    horizon_tokens: NonNegativeFloat = 0.0
    nodes: tuple[NodeIdField, ...] = Field(default=(), max_length=1024)
    """The subset of nodes the plan in force after this decision uses."""
    outcome: Literal["none", "pending", "committed", "aborted", "failed"] = "none"
    outcome_detail: ShortText = ""
    baseline_tpot_s: NonNegativeFloat | None = None
    """Mean time per output token of requests before the decision (measured)."""
    realised_tpot_s: NonNegativeFloat | None = None
    """Mean time per output token of requests that started after the commit (measured)."""
    realised_requests: NonNegativeInt = 0


class PrivacyPolicySet(Message):
    """Event (retained): the privacy policy in force. Blocks [0, ``private_blocks``), the
    embedding and the head may run only on nodes with trust >= ``trusted_level``."""

    private_blocks: Annotated[int, Field(ge=0, le=65_536)]
    trusted_level: Annotated[int, Field(ge=0, le=1_000)]
    set_at_s: NonNegativeFloat = 0.0
    reason: ShortText = ""


# --- reconfiguration broadcast -------------------------------------------------------------


class RolloutRequested(Message):
    """Command to the broadcaster: roll ``plan`` out as the next epoch (two-phase).

    The broadcaster assigns the epoch (``plan.epoch`` is ignored) and signs the plan.
    """

    decision_id: NonNegativeInt
    plan: Plan
    reason: ShortText = ""
    ready_timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0


class RolloutFinished(Message):
    """Event: how a rollout ended. ``committed`` means every node of the plan was READY
    and COMMIT was published; ``aborted`` means a NACK or a READY timeout, and every node
    stays on ``previous_epoch``."""

    decision_id: NonNegativeInt
    epoch: Epoch
    previous_epoch: Epoch
    outcome: Literal["committed", "aborted"]
    reason: ShortText = ""
    prepare_s: NonNegativeFloat = 0.0
    """From PREPARE to the last READY (or to the abort)."""


class EpochLedger(Message):
    """The broadcaster's retained record of epoch numbering, so a restart neither reuses an
    epoch number (an aborted one is burned: workers may have prepared it) nor leaves a
    rollout half-prepared. Written before PREPARE and after COMMIT / ABORT."""

    highest_epoch: Epoch
    """The highest epoch number ever used (committed or aborted)."""
    in_progress: Epoch | None = None
    """The epoch being rolled out (PREPARE sent, no COMMIT / ABORT yet), if any."""
    decision_id: NonNegativeInt | None = None
    """The decision of the rollout in progress."""
    previous_epoch: Epoch = 0
    """The committed epoch when the rollout in progress started."""


# --- split reviser ------------------------------------------------------------------------


class PlanWeights(_Part):
    """Weights of the planner's richer objective terms (docs/PLANNER.md; all 0: latency)."""

    balance: NonNegativeFloat = 0.0
    privacy_s: NonNegativeFloat = 0.0
    migration: NonNegativeFloat = 0.0
    """Per-token seconds charged per second of one-off migration (1 / payback tokens)."""
    bottleneck_tolerance: NonNegativeFloat = 0.0


class PlanRequested(Message):
    """Command to the split reviser: plan ``model_id`` on the nodes and links of ``profile``.

    The answer (`PlanProposed`, same ``request_id``) goes to the reviser-replies topic of
    ``reply_to`` (a client or service id, never a raw topic string).
    """

    request_id: RequestIdField
    reply_to: TopicId
    model_id: ShortText
    source: NodeIdField
    """The entry node: it holds the embedding and head and receives the output."""
    profile: CapacityProfile
    private_blocks: Annotated[int, Field(ge=0, le=65_536)] = 0
    """Blocks [0, k) (and the embedding and head) need trust >= trusted_level."""
    trusted_level: Annotated[int, Field(ge=0, le=1_000)] = 0
    objective: Literal["latency", "throughput"] = "latency"
    weights: PlanWeights = PlanWeights()
    current_segments: tuple[Segment, ...] = Field(default=(), max_length=1024)
    """The running plan (empty: nothing loaded); migration costs are counted from it."""
    alternatives: Annotated[int, Field(ge=0, le=16)] = 0
    context_tokens: Annotated[int, Field(ge=0, le=2**24)] = 0
    """KV-cache tokens per request the memory constraint reserves."""
    concurrent_requests: Annotated[int, Field(ge=1, le=65_536)] = 1
    method: Literal["auto", "exact", "fast"] = "auto"
    time_limit_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """The solver's budget for choosing its method (the reviser's own deadline applies too)."""


class PlanOption(_Part):
    """One plan and its predicted costs (seconds per token, migration one-off)."""

    segments: tuple[Segment, ...] = Field(min_length=1, max_length=1024)
    latency_s: NonNegativeFloat
    bottleneck_s: NonNegativeFloat
    migration_cost_s: NonNegativeFloat
    """One-off seconds to move from the request's current plan to this one."""
    weighted_cost_s: NonNegativeFloat
    """Latency plus the weighted extra terms: what the solver minimised."""


class PlanProposed(Message):
    """Event: the split reviser's answer to a `PlanRequested`.

    ``feasible`` with ``best`` and up to ``alternatives`` next-best distinct plans in
    objective order; otherwise ``reason`` says why, and ``error`` is set when the request
    itself could not be planned (invalid, timed out, failed) rather than having no plan.
    """

    request_id: RequestIdField
    feasible: bool
    reason: ShortText = ""
    error: Literal["invalid_request", "timeout", "internal"] | None = None
    objective: Literal["latency", "throughput"] = "latency"
    best: PlanOption | None = None
    alternatives: tuple[PlanOption, ...] = Field(default=(), max_length=16)
    method: Literal["exact", "fast"] | None = None
    optimal: bool = False
    """True when ``best`` is proven optimal."""
    solve_s: NonNegativeFloat = 0.0
    profile_as_of_s: NonNegativeFloat = 0.0
    """``as_of_s`` of the profile the plan was computed from."""

    @model_validator(mode="after")
    def _consistent(self) -> PlanProposed:
        if self.feasible != (self.best is not None):
            raise ValueError("a feasible answer has a best plan, an infeasible one has none")
        if self.error is not None and self.feasible:
            raise ValueError(f"an answer with error {self.error!r} cannot be feasible")
        return self
