"""What a worker checks of a decoded frame before it allocates or computes anything.

`decode_frame` (shared/tensor_frame.py) guarantees a typed header and a tensor whose
bytes match its dtype and shape. This module checks the rest against the model this
worker serves (`FrameLimits`): the dtype and shape each kind must have, positions and
token counts within the model's context (a T x S attention mask and K/V of S tokens are
built from them), and float values that are all finite (a NaN would spread through every
later block and into the sampled token). Every failure is a `FrameRefused` that says
what was wrong; the data plane counts it (``frames_refused``) and drops the frame.

Costs: the layout checks are a few attribute reads per frame; `require_finite` is one
vectorised pass over the tensor, measured on the 2-core dev box at about 3 us for a
[1, 576] decode row and 0.23 ms for a [2048, 576] prefill (against tens to hundreds of
ms of compute for that frame). Activations and results are checked on the event loop,
before the frame is remembered as seen, so a corrupt copy cannot shadow the genuine
frame; a kv frame (up to megabytes, rare) is checked on the compute thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.worker.errors import FrameRefused
from shared.errors import TensorFrameError
from shared.frame_headers import (
    ActivationHeader,
    BatchHeader,
    FrameHeader,
    HandoffHeader,
    KvAckHeader,
    KvHeader,
    ProbeHeader,
    ReleaseHeader,
    ResultHeader,
)
from shared.model.config import ModelConfig
from shared.tensor_frame import decompress_activation


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """The model numbers a frame is checked against. ``hidden_size``: width of a hidden
    state; ``max_positions``: the model's context (tokens); ``num_kv_heads`` and
    ``head_dim``: the K/V geometry of one block."""

    hidden_size: int
    max_positions: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: ModelConfig) -> FrameLimits:
        return cls(config.hidden_size, config.max_positions, config.num_kv_heads, config.head_dim)


def check_frame(header: FrameHeader, array: np.ndarray, limits: FrameLimits) -> None:
    """The checks of a received frame that do not need the receiving segment (a kv
    frame's are `check_kv`, and its values are checked on the compute thread).

    Raises FrameRefused naming what is wrong.
    """
    match header:
        case ActivationHeader():
            check_activation(header, array, limits)
        case ResultHeader():
            check_result(header, array, limits)
        case HandoffHeader():
            check_empty(header.kind, array)
            if header.pos > limits.max_positions:
                raise FrameRefused(f"handoff frame moves {header.pos} tokens of K/V, over the "
                                   f"model's {limits.max_positions}-token context")  # fmt: skip
        case ReleaseHeader() | KvAckHeader():
            check_empty(header.kind, array)
        case BatchHeader():
            check_batch(header, array, limits)


def duplicate_key(header: FrameHeader) -> tuple[object, ...] | None:
    """What makes a frame a duplicate of one already handled: same kind, request, step,
    epoch, pass and hop target. None for a release (no pass; releasing twice is harmless),
    a probe and a batch frame: never deduplicated as a whole."""
    if isinstance(header, ReleaseHeader | ProbeHeader | BatchHeader):
        return None  # a batch frame's rows are deduplicated one by one, once split
    target = header.target if isinstance(header, ActivationHeader | HandoffHeader | KvHeader) else None
    return (header.kind, header.request_id, header.step, header.epoch, header.pass_id, target)


def check_activation(header: ActivationHeader, array: np.ndarray, limits: FrameLimits) -> None:
    """float32 [T, hidden] with T >= 1, ``pos + T`` within the context, all finite.

    Raises FrameRefused naming what is wrong.
    """
    hidden = limits.hidden_size
    if array.ndim != 2 or not array.shape[0]:
        raise FrameRefused(f"activation must be float32 [T, {hidden}] with T >= 1 (or compressed), "
                           f"got {array.dtype}{list(array.shape)}")  # fmt: skip
    try:  # fp32, or compressed (fp16; int8 with per-row scales): shared/tensor_frame.py
        values = decompress_activation(array, hidden) if array.dtype != np.float32 else array
    except TensorFrameError as error:
        raise FrameRefused(f"activation must be float32 [T, {hidden}] with T >= 1: {error}") from None
    if values.shape[1] != hidden:
        raise FrameRefused(
            f"activation must be float32 [T, {hidden}] with T >= 1, got {array.dtype}{list(array.shape)}"
        )
    _check_context("activation", header.pos, array.shape[0], limits)
    require_finite("activation", values)


def check_batch(header: BatchHeader, array: np.ndarray, limits: FrameLimits) -> None:
    """The header's request and step are its first row's, each request once (a result row
    with no position or ``last_only``); one row per `BatchRow` (the rows' activations or
    results, float32 [R, hidden] or compressed), each row's position within the context
    and past 0, all finite. (Each row is checked
    again as its own activation or result once the frame is split.)

    Raises FrameRefused naming what is wrong.
    """
    hidden, first = limits.hidden_size, header.rows[0]
    if (first.request_id, first.step) != (header.request_id, header.step):
        raise FrameRefused(f"batch frame says request {header.request_id} step {header.step}; its first "
                           f"row is request {first.request_id} step {first.step}")  # fmt: skip
    if len({row.request_id for row in header.rows}) != len(header.rows):
        raise FrameRefused("batch frame names a request twice (one row per request)")
    if header.of == "result" and any(row.pos or row.last_only for row in header.rows):
        raise FrameRefused("batch frame of results has a row with a position or last_only")
    if array.ndim != 2 or array.shape[0] != len(header.rows):
        raise FrameRefused(f"batch frame of {len(header.rows)} rows must be [{len(header.rows)}, {hidden}] "
                           f"(or compressed), got {array.dtype}{list(array.shape)}")  # fmt: skip
    try:
        values = decompress_activation(array, hidden)
    except TensorFrameError as error:
        raise FrameRefused(f"batch frame of {len(header.rows)} rows: {error}") from None
    if header.of == "activation":
        for row in header.rows:
            _check_context("batch", row.pos, 1, limits)
            if row.pos == 0:
                raise FrameRefused(f"batch frame row of request {row.request_id} is at position 0: "
                                   "a prefill travels in a frame of its own")  # fmt: skip
    require_finite("batch", values)


def check_result(header: ResultHeader, array: np.ndarray, limits: FrameLimits) -> None:
    """float32 [R, hidden], R in [1, context], all finite; empty when ``kv_missing``.
    (The entry checks R against the pass: T rows, or 1 with ``last_only``.)

    Raises FrameRefused naming what is wrong.
    """
    hidden = limits.hidden_size
    if header.kv_missing:
        if array.size:
            raise FrameRefused(f"a kv_missing result must be empty, got {array.dtype}{list(array.shape)}")
        return
    shape = f"float32 [T or 1, {hidden}] with 1 <= T <= {limits.max_positions} (or compressed)"
    if array.ndim != 2 or not 1 <= array.shape[0] <= limits.max_positions:
        raise FrameRefused(f"result must be {shape}, got {array.dtype}{list(array.shape)}")
    try:  # fp32, or compressed like an activation (the plan's precision for the return hop)
        values = decompress_activation(array, hidden)
    except TensorFrameError as error:
        raise FrameRefused(f"result must be {shape}: {error}") from None
    require_finite("result", values)


def check_kv(header: KvHeader, array: np.ndarray, limits: FrameLimits, start: int, end: int) -> None:
    """float32 [len(blocks), 2, kv_heads, pos, head_dim], ``pos`` in [1, context], the
    blocks distinct and inside this node's segment [start, end).

    Raises FrameRefused naming what is wrong.
    """
    expected = (len(header.blocks), 2, limits.num_kv_heads, header.pos, limits.head_dim)
    if array.dtype != np.float32 or array.shape != expected:
        raise FrameRefused(
            f"kv frame must be float32 {list(expected)} (blocks, K/V, kv heads, pos, head dim), "
            f"got {array.dtype}{list(array.shape)}"
        )
    _check_context("kv", 0, header.pos, limits)
    if len(set(header.blocks)) != len(header.blocks) or not all(
        start <= block < end for block in header.blocks
    ):
        raise FrameRefused(
            f"kv frame names blocks {list(header.blocks)}; this node holds [{start}, {end}) "
            "and each block may come once"
        )


def check_empty(kind: str, array: np.ndarray) -> None:
    """Release, handoff and kv_ack frames carry no values (a release is forwarded as is).

    Raises FrameRefused for a tensor that is not empty.
    """
    if array.size:
        raise FrameRefused(f"a {kind} frame carries no values, got {array.dtype}{list(array.shape)}")


def require_finite(kind: str, array: np.ndarray) -> None:
    """Raise FrameRefused when ``array`` holds a NaN or an infinity (one pass over it)."""
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise FrameRefused(f"{kind} frame holds {bad} NaN or infinite values: the sender's compute "
                           "or the link corrupted it")  # fmt: skip


def _check_context(kind: str, pos: int, tokens: int, limits: FrameLimits) -> None:
    if tokens < 1 or pos + tokens > limits.max_positions:
        raise FrameRefused(
            f"{kind} frame covers positions {pos}..{pos + tokens - 1}: it needs at least one "
            f"token, within the model's {limits.max_positions}-token context"
        )
