"""Batch frames: decode steps of several requests that leave a stage together travel to
the next node as ONE frame (shared/frame_headers.py `BatchHeader`, issue #21), so a
batch of N steps costs one hop, one MAC and one broker message instead of N.

Sending (`OutboundBatches`): a decode step's activation (or, at the last segment, its
result for the entry) is queued under (destination, epoch, target, kind, dtype, width)
instead of being sent at once. The first step queued under a key starts the task that
sends the key's queue; that task runs on the next turn of the event loop, after every
step woken in the same turn queued too. The steps of one batched forward are woken in
one turn (batching.py hands all their results over in one callback), so they leave as
one frame. A queue of one step leaves as today's activation or result frame (a lone
request's wire is unchanged); a larger one as batch frames of at most `MAX_BATCH_ROWS`
rows and `MAX_FRAME_BYTES` (the broker's max packet), a request at most once per frame.
Prefill, releases, kv_missing answers, handoff and kv frames never come here.

Receiving (`split_batch`): once the data plane checked the frame's layout and its MAC
and sender (frame_checks.py, frame_auth.py), the frame is split into one activation or
result per row, in row order, each handled like a frame of its own (deduplicated,
checked, fenced); the service starts all the rows' decode steps in the same turn, so
the next stage runs them as one batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.frame_headers import (
    MAX_BATCH_ROWS,
    ActivationHeader,
    BatchHeader,
    BatchRow,
    FrameHeader,
    ResultHeader,
)
from shared.ids import NodeId
from shared.tensor_frame import MAX_FRAME_BYTES, MAX_HEADER_BYTES, Frame

log = logging.getLogger(__name__)
Seal = Callable[[str, FrameHeader, np.ndarray], Awaitable[bytes]]
SendPayload = Callable[[str, bytes], Awaitable[None]]
GroupKey = tuple[str, int, int, str, str, int]
"""(destination, epoch, target block, header kind, dtype, row width): rows that may share a frame."""
_FRAME_ROOM_BYTES = MAX_FRAME_BYTES - MAX_HEADER_BYTES - 64
"""Tensor bytes one batch frame may carry (prefix, header and padding need the rest)."""


@dataclass(eq=False)
class _Row:
    header: ActivationHeader | ResultHeader
    array: np.ndarray
    """[1, width]: the step's activation or result, compressed as it travels."""
    target: int
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class OutboundBatches:
    """The decode steps this node sends, batched per next hop. ``seal`` authenticates a
    frame (frame_auth.py), ``send`` is the (shaped) egress, ``seq`` the node's frame
    counter. ``counters`` (the data plane's) gets ``batched_frames_sent`` and
    ``batched_frames_rows`` (the rows they carried). ``enabled`` False: every step is
    sent as its own frame at once (the wire before batch frames; for measuring)."""

    def __init__(self, seal: Seal, send: SendPayload, seq: Iterator[int], counters: Counter[str],
                 enabled: bool = True) -> None:  # fmt: skip
        self._seal, self._send, self._seq, self.counters = seal, send, seq, counters
        self.enabled = enabled
        self._open: dict[GroupKey, list[_Row]] = {}
        self._flushing: set[asyncio.Task[None]] = set()  # referenced until done

    async def send(self, destination: str, header: ActivationHeader | ResultHeader, array: np.ndarray,
                   target: int) -> None:  # fmt: skip
        """Send one decode step's [1, width] ``array`` under ``header`` to ``destination``
        (whose segment starts at ``target``, the layer count for a result), in one frame
        with the other steps sent to the same hop in this turn of the event loop.

        Raises what sealing or sending its frame raises (FrameRefused, BusError)."""
        if not self.enabled:
            await self._send(destination, await self._seal(destination, header, array))
            return
        key = (destination, header.epoch, target, header.kind, array.dtype.str, int(array.shape[1]))
        row = _Row(header, array, target)
        queued = self._open.get(key)
        if queued is None:  # the first of this turn: its task sends what queued by then
            self._open[key] = queued = []
            task = asyncio.ensure_future(self._flush(key))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        queued.append(row)
        await row.future

    async def _flush(self, key: GroupKey) -> None:
        """Send ``key``'s queued rows: one frame each chunk; settle each row's future."""
        rows = self._open.pop(key, [])
        for chunk in chunked(rows):
            try:
                if len(chunk) == 1:
                    payload = await self._seal(key[0], chunk[0].header, chunk[0].array)
                else:
                    header, array = batch_of(chunk, next(self._seq))
                    payload = await self._seal(key[0], header, array)
                await self._send(key[0], payload)
            except asyncio.CancelledError:
                _settle(chunk, asyncio.CancelledError())
                raise
            except Exception as error:  # noqa: BLE001 - each row's sender gets it
                _settle(chunk, error)
                continue
            if len(chunk) > 1:
                self.counters["batched_frames_sent"] += 1
                self.counters["batched_frames_rows"] += len(chunk)
            _settle(chunk, None)


def chunked(rows: list[_Row]) -> Iterator[list[_Row]]:
    """``rows`` in order, as frames: at most `MAX_BATCH_ROWS` rows and `_FRAME_ROOM_BYTES`
    tensor bytes each, and each request at most once (a replayed request's new pass
    and a late step of its old one go in different frames)."""
    if not rows:
        return
    most = max(1, min(MAX_BATCH_ROWS, _FRAME_ROOM_BYTES // max(1, rows[0].array.nbytes)))
    chunk: list[_Row] = []
    requests: set[str] = set()
    for row in rows:
        if len(chunk) >= most or row.header.request_id in requests:
            yield chunk
            chunk, requests = [], set()
        chunk.append(row)
        requests.add(row.header.request_id)
    yield chunk


def batch_of(rows: list[_Row], seq: int) -> tuple[BatchHeader, np.ndarray]:
    """The batch frame of two or more ``rows`` (same hop, epoch, kind and layout)."""
    first = rows[0].header
    result = isinstance(first, ResultHeader)
    batch_rows = tuple(
        BatchRow(request_id=row.header.request_id, step=row.header.step, pass_id=row.header.pass_id)
        if isinstance(row.header, ResultHeader)
        else BatchRow(request_id=row.header.request_id, step=row.header.step, pass_id=row.header.pass_id,
                      pos=row.header.pos, last_only=row.header.last_only)  # fmt: skip
        for row in rows
    )
    header = BatchHeader(request_id=first.request_id, step=first.step, epoch=first.epoch, seq=seq,
                         src=first.src, sent_at=time.time(), of="result" if result else "activation",
                         target=rows[0].target, rows=batch_rows)  # fmt: skip
    return header, np.concatenate([row.array for row in rows])


def split_batch(header: BatchHeader, array: np.ndarray) -> list[Frame]:
    """A checked and authenticated batch frame as one activation or result frame per row
    (views of ``array``, in row order), stamped with the batch's sender, time and seq.

    The headers are built without validating again: every field comes from the batch
    header, validated when the frame was decoded."""
    frames: list[Frame] = []
    src: NodeId | None = header.src
    for index, row in enumerate(header.rows):
        common: dict[str, Any] = {"request_id": row.request_id, "step": row.step, "epoch": header.epoch, "seq": header.seq,
                  "src": src, "sent_at": header.sent_at, "pass_id": row.pass_id}  # fmt: skip
        item: ActivationHeader | ResultHeader
        if header.of == "result":
            item = ResultHeader.model_construct(**common)
        else:
            item = ActivationHeader.model_construct(**common, target=header.target, pos=row.pos,
                                                    last_only=row.last_only)  # fmt: skip
        frames.append(Frame(item, array[index : index + 1]))
    return frames


def _settle(rows: list[_Row], error: BaseException | None) -> None:
    for row in rows:
        if row.future.done():  # its sender was cancelled meanwhile
            continue
        if error is None:
            row.future.set_result(None)
        elif isinstance(error, asyncio.CancelledError):
            row.future.cancel()
        else:
            row.future.set_exception(error)
