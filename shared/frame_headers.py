"""The headers of data-plane frames: one frozen, strict model per kind of frame.

Every tensor frame (`shared/tensor_frame.py`) carries exactly one of these, tagged by
its ``kind`` string on the wire; a header with an unknown kind, a missing or surplus
field, or a field out of its bounds is refused when the frame is decoded. The kinds:

==============  =====================================  ==========================================
kind            sent by -> to                          tensor
==============  =====================================  ==========================================
``activation``  entry or a worker -> the next segment  float32 [T, hidden]: the hidden states
``result``      the last segment -> the entry          float32 [T or 1, hidden]; empty when
                                                       ``kv_missing``
``release``     entry -> each segment in turn          empty: free the request's KV caches
``handoff``     entry -> each node of the old epoch    empty: move your K/V to the new owners
``kv``          an old holder -> a new owner           the cache's [n, 2, heads, T, head_dim]
``kv_ack``      an old holder or new owner -> entry    empty: the handoff's answers
``probe``       a worker -> a peer (ping), and back    uint8 padding that sizes the probe
``batch``       a stage -> the next (decode steps of   the rows' activations or results
                several requests that travel together) stacked: [R, hidden] (or compressed)
==============  =====================================  ==========================================

Common fields (every kind): ``request_id``, ``step`` (decode step, 0 = prefill; a
handoff uses steps from ``HANDOFF_STEP`` up, services/worker/handoff.py), ``epoch``
(the plan epoch that serves the frame), ``seq`` (the sender's frame counter; a
probe's id) and ``mac`` (the frame's authentication under its epoch's key; see
docs/SECURITY.md, "Frames"). Every kind but the probe names its sender in ``src``. A block index (``target``, ``blocks``) is in [0, 2**31); counters and
positions are in [0, 2**63).

A ``batch`` frame carries R >= 2 decode steps (one row each) bound for the same node,
epoch and segment: one frame, one MAC, one hop for the whole batch (issue #21). Each
row's own fields (request, step, pass, position, ``last_only``) are a `BatchRow`; the
receiver splits it into one activation (or result) per row, in row order. Its
``request_id`` and ``step`` are those of its first row, so that code which names a
frame's request names a real one.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from shared.ids import NodeIdField, RequestIdField

Count = Annotated[int, Field(ge=0, lt=2**63)]
"""A non-negative counter, position, step or epoch (msgpack's unsigned 63-bit range)."""
Block = Annotated[int, Field(ge=0, lt=2**31)]
"""A transformer block index (a segment's first block, or a model's layer count)."""
MAC_BYTES = 32
"""Length of a frame's MAC (HMAC-SHA256)."""
MAX_KV_BLOCKS = 4096
"""The most blocks one kv frame may carry (the frame decoder's array limit)."""
MAX_BATCH_ROWS = 256
"""The most decode steps one batch frame may carry: a row's header fields take at most
about 130 bytes of msgpack (a 64-character request id), so 256 rows stay well inside the
frame decoder's 64 KB header limit (shared/tensor_frame.py); a larger batch is sent as
several frames."""


class _Header(BaseModel):
    """What every frame says about whose it is."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)

    request_id: RequestIdField
    step: Count
    """Decode step (0 = prefill)."""
    epoch: Count
    """The plan epoch whose pipeline serves this frame."""
    seq: Count
    """The sender's frame counter (a probe's id)."""
    mac: Annotated[bytes, Field(max_length=MAC_BYTES)] = b""
    """HMAC-SHA256 of the rest of the frame (every other header field, dtype, shape and
    the tensor bytes) under the key of the frame's epoch (shared/tensor_frame.py
    `frame_mac`); empty on a probe. A worker drops a frame whose MAC does not verify."""


class _Stamped(_Header):
    """A frame the data plane forwards: it stamps its node and the send time on each hop,
    so the receiver can estimate the inbound link passively (services/worker/probes.py)."""

    src: NodeIdField | None = None
    """The node that sent this hop (None before the first hop is sent)."""
    sent_at: float | None = None
    """When this hop was sent (Unix s, finite; None before the first hop is sent)."""


class ActivationHeader(_Stamped):
    """Hidden states for the segment that starts at block ``target``."""

    kind: Literal["activation"] = "activation"
    target: Block
    """The next block to run: the first block of the receiver's segment."""
    pos: Count
    """Position of the frame's first token in the request's sequence."""
    last_only: bool
    """The last segment sends back only the last row (the entry needs no more)."""
    pass_id: Count
    """The entry's pass this frame belongs to (the result must carry it back)."""


class ResultHeader(_Stamped):
    """The final hidden states of a pass, for the entry; or, with ``kv_missing``, an
    empty answer saying that a node of the pipeline lacks the request's KV cache (the
    entry then replays the request)."""

    kind: Literal["result"] = "result"
    pass_id: Count
    """The pass this answers (a result of an earlier try is dropped)."""
    kv_missing: bool = False
    kv_over_budget: bool = False
    """With ``kv_missing``: the node refused to grow the request's KV past its budget
    (the entry answers ``overloaded`` instead of replaying)."""


class ReleaseHeader(_Stamped):
    """Free the request's KV caches on the segment starting at ``target``, then pass it on."""

    kind: Literal["release"] = "release"
    target: Block


class HandoffHeader(_Header):
    """Entry -> a node of the old epoch (``epoch``): send the K/V of your blocks that move
    to their new owners under ``new_epoch``, then answer with a `KvAckHeader`."""

    kind: Literal["handoff"] = "handoff"
    target: Block
    """The first block of the receiver's segment in the old epoch."""
    pos: Count
    """Tokens the request's KV caches must hold."""
    new_epoch: Count
    pass_id: Count
    ack_base: Count
    """The step of the first new owner's acknowledgement (they are numbered from here,
    in the order of the owners' sorted names)."""
    src: NodeIdField | None = None
    """The entry that sent it."""


class KvHeader(_Header):
    """An old holder's K/V of ``blocks`` for their new owner (``epoch`` is the new one)."""

    kind: Literal["kv"] = "kv"
    target: Block
    """The first block of the receiver's segment in the new epoch."""
    blocks: Annotated[tuple[Block, ...], Field(min_length=1, max_length=MAX_KV_BLOCKS)]
    """The blocks whose K/V the tensor holds, in its first dimension's order."""
    pos: Count
    """Tokens each block's K/V holds."""
    ack_step: Count
    """The step of the acknowledgement the receiver sends the entry."""
    old_epoch: Count
    """The epoch of the acknowledgement (the entry waits under the old epoch)."""
    pass_id: Count
    src: NodeIdField | None = None
    """The old holder that sent it."""


class KvAckHeader(_Header):
    """An answer to the entry's handoff: an old holder sent its K/V (``failed``: it had
    none to send), or a new owner imported the K/V of a `KvHeader` frame."""

    kind: Literal["kv_ack"] = "kv_ack"
    pass_id: Count
    failed: bool = False
    src: NodeIdField | None = None
    """The old holder or new owner that sent it."""


class ProbeHeader(_Header):
    """A link probe (``ping``) or its echo: see services/worker/probes.py. ``seq`` is the
    probe's id; ``src`` the node that sent this frame."""

    kind: Literal["probe"] = "probe"
    role: Literal["ping", "echo"]
    src: NodeIdField
    held_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    """An echo: how long it waited in its sender's egress queue behind earlier frames
    before its link was free (0 on an unshaped link). The prober takes it off the echo's
    arrival, so a pair's gap is the sized probe's time on the link, not that plus the
    activation frames the peer happened to be sending back."""


class BatchRow(BaseModel):
    """One decode step of a batch frame: the per-request fields of the activation (or
    result) it stands for. A result row's ``pos`` is 0 and its ``last_only`` False."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)

    request_id: RequestIdField
    step: Count
    pass_id: Count
    pos: Count = 0
    last_only: bool = False


class BatchHeader(_Stamped):
    """Several requests' decode steps for the same node, epoch and segment in one frame:
    row i of the tensor is ``rows[i]``'s activation (``of`` "activation", for the segment
    starting at block ``target``) or final state (``of`` "result", for the entry, whose
    ``target`` is the model's layer count). The MAC covers every row. The receiver
    refuses a frame whose ``request_id`` and ``step`` are not its first row's, that
    names a request twice, or whose result rows have a position or ``last_only``
    (services/worker/frame_checks.py `check_batch`)."""

    kind: Literal["batch"] = "batch"
    of: Literal["activation", "result"]
    target: Block
    rows: Annotated[tuple[BatchRow, ...], Field(min_length=2, max_length=MAX_BATCH_ROWS)]


FrameHeader = Annotated[
    ActivationHeader
    | ResultHeader
    | ReleaseHeader
    | HandoffHeader
    | KvHeader
    | KvAckHeader
    | ProbeHeader
    | BatchHeader,
    Field(discriminator="kind"),
]
"""Any frame's header: a union tagged by ``kind``."""

FRAME_KINDS: dict[str, type[_Header]] = {
    cls.model_fields["kind"].default: cls for cls in get_args(get_args(FrameHeader)[0])
}
"""Each wire ``kind`` string and its header model."""
