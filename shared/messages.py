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
    error: Literal["busy", "context_too_long", "timeout", "invalid_request", "internal"]
    message: ShortText


# --- monitor and orchestrator --------------------------------------------------------------


class NodeCapacity(_Part):
    node: NodeIdField
    alive: bool
    trust: NonNegativeInt
    memory_free_bytes: NonNegativeInt
    flops_per_s: NonNegativeFloat
    utilisation: Annotated[float, Field(ge=0, le=1)]


class LinkCapacity(_Part):
    src: NodeIdField
    dst: NodeIdField
    bandwidth_bytes_per_s: NonNegativeFloat
    latency_s: NonNegativeFloat


class CapacityProfile(Message):
    """The monitor's current view of nodes and links (retained)."""

    as_of_s: NonNegativeFloat
    """Unix time of the newest observation included."""
    nodes: tuple[NodeCapacity, ...] = Field(max_length=1024)
    links: tuple[LinkCapacity, ...] = Field(default=(), max_length=4096)


class ProfileEvent(Message):
    """Event: the monitor saw a change worth a planning decision."""

    event: Literal["node_joined", "node_lost", "link_changed", "load_changed", "sla_missed"]
    node: NodeIdField | None = None
    detail: ShortText = ""
    emergency: bool = False
    """True skips hysteresis (a node was lost)."""


class Candidate(_Part):
    summary: ShortText
    """Segments as text, e.g. "car-1[0,4) rsu-1[4,30)"."""
    predicted_latency_s: NonNegativeFloat
    migration_cost_s: NonNegativeFloat = 0.0


class DecisionRecorded(Message):
    """Event: what the orchestrator decided and why (retained; shown by `status`)."""

    decision_id: NonNegativeInt
    trigger: ShortText
    candidates: tuple[Candidate, ...] = Field(default=(), max_length=256)
    action: Literal["keep", "migrate", "resplit"]
    predicted_gain_s: float = 0.0
    """Predicted latency saved per token over the horizon, minus migration cost."""
    from_epoch: Epoch | None = None
    to_epoch: Epoch | None = None
    realised_gain_s: float | None = None
