"""Moving a request's KV caches when split points move (the KV handoff).

At a token boundary no frame of the request is in flight, so the entry sends every node
of the old pipeline its handoff frame at once; each sends the K/V of its blocks to their
new owners (or keeps them) and answers the entry; each new owner acknowledges what it
received. `KvHandoff` is the part of `DataPlane` (services/worker/dataplane.py) that does
this; the entry replays the request instead when anything is missing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import numpy as np
import torch

from services.worker.compute import ComputeThread, SegmentHost
from services.worker.deadline import StageDeadline
from services.worker.epochs import EpochKeeper, Serving
from services.worker.errors import FrameRefused
from shared.frame_headers import FrameHeader, HandoffHeader, KvAckHeader, KvHeader
from shared.ids import RequestId
from shared.tensor_frame import Frame, encode_frame, to_torch


class KvHandoff:
    """Mixin of `DataPlane`: the handoff's side of a worker's data plane."""

    node: str
    hidden_size: int
    keeper: EpochKeeper
    compute: ComputeThread
    stage_timeout_s: float
    deadline: StageDeadline
    counters: Counter[str]
    down: set[str]
    _send_payload: Callable[[str, bytes], Awaitable[None]]
    _pending: dict[tuple[str, int, int], tuple[int, asyncio.Future[Frame]]]
    _pass_ids: Iterator[int]
    _seq: Iterator[int]
    _resolve: Callable[[Frame], None]
    """Accept an answer for the entry's pending wait (`DataPlane._resolve`)."""

    async def handoff(self, request_id: str, old_epoch: int, length: int) -> bool:
        """Move a request's KV caches from the old epoch's owners to the new ones.

        At a token boundary no frame of the request is in flight, so every node of the old
        pipeline gets its handoff frame at once (one round trip, not one hop per node);
        each sends the K/V of its blocks to their new owners (or keeps them), then answers
        the entry, and each new owner answers the entry once it imported them: the first
        step of the new epoch must not overtake its K/V (they come from other senders).
        True when every answer came; False (the entry then replays) on a failed one or
        after the deadline of about one pass.
        """
        old = self.keeper.for_frame(old_epoch, time.monotonic())
        new = self.keeper.current
        if old is None or new is None or new.epoch == old_epoch:
            return False
        if self.down.intersection(old.route.nodes()):
            return False  # the old pipeline lost a node: its caches are gone, replay
        holders = [(node, segment) for node in old.route.nodes()
                   if (segment := old.route.segment_of(node)) is not None]  # fmt: skip
        loop, pass_id = asyncio.get_running_loop(), next(self._pass_ids)
        moves = [len(_new_owners(new, node, start, end)) for node, (start, end) in holders]
        bases = [HANDOFF_STEP + len(holders) + sum(moves[:index]) for index in range(len(holders))]
        keys = [(request_id, HANDOFF_STEP + index, old_epoch) for index in range(len(holders) + sum(moves))]
        futures: list[asyncio.Future[Frame]] = [loop.create_future() for _ in keys]
        self._pending.update({key: (pass_id, future) for key, future in zip(keys, futures, strict=True)})
        empty = np.zeros((0, self.hidden_size), np.float32)
        try:
            for (node, (start, _)), key, base in zip(holders, keys, bases, strict=False):
                header = HandoffHeader(request_id=RequestId(request_id), step=key[1], epoch=old_epoch, seq=0,
                                       target=start, pos=length, new_epoch=new.epoch, pass_id=pass_id,
                                       ack_base=base)  # fmt: skip
                if node == self.node:
                    await self._on_handoff(header, empty, old)
                else:
                    await self._send_payload(node, encode_frame(header, empty))
            async with asyncio.timeout(self.deadline.timeout_s(1)):  # about one pass; then replay
                for answered in asyncio.as_completed(futures):
                    if _failed((await answered).header):
                        return False
            return True
        except TimeoutError:
            return False
        finally:
            for key in keys:
                self._pending.pop(key, None)

    async def _on_handoff(self, header: HandoffHeader, array: np.ndarray, old: Serving) -> None:
        """An old holder's side: send the K/V of its blocks that move to their new owners
        (blocks that stay go into the new host at once), then answer the entry."""
        route, host = old.route, old.host
        new = self.keeper.for_frame(header.new_epoch, time.monotonic())
        failed = new is None or host is None
        if not failed and host is not None and new is not None:
            outgoing = await self.compute.run(
                _split_kv, host, new, self.node, header.request_id, header.pos
            )
            failed = outgoing is None
            owners = _new_owners(new, self.node, host.start, host.end)
            for owner, (blocks, tensor) in (outgoing or {}).items():
                out = KvHeader(request_id=header.request_id, step=header.step, epoch=new.epoch,
                               seq=next(self._seq), target=new.route.segment_of(owner)[0],  # type: ignore[index]
                               blocks=blocks, pos=header.pos, ack_step=header.ack_base + owners.index(owner),
                               old_epoch=route.epoch, pass_id=header.pass_id)  # fmt: skip
                await self._send_payload(owner, encode_frame(out, tensor))
        answer = KvAckHeader(request_id=header.request_id, step=header.step, epoch=route.epoch,
                             seq=next(self._seq), pass_id=header.pass_id, failed=failed)  # fmt: skip
        await self._answer_entry(route.entry, answer, array)

    async def _on_kv(self, header: KvHeader, array: np.ndarray, serving: Serving) -> None:
        """A new owner's side: import the K/V of ``header.blocks``, then acknowledge."""
        host = serving.host
        if host is None or array.ndim != 5:
            raise FrameRefused("a kv frame needs a segment here and a 5-d tensor")
        if array.shape[0] != len(header.blocks):
            raise FrameRefused(f"kv frame holds {array.shape[0]} blocks, names {len(header.blocks)}")
        tensor = to_torch(np.ascontiguousarray(array))
        moved = {block: (tensor[i, 0], tensor[i, 1]) for i, block in enumerate(header.blocks)}
        host.import_kv(header.request_id, moved)
        self.counters["kv_blocks_received"] += len(moved)
        ack = KvAckHeader(request_id=header.request_id, step=header.ack_step, epoch=header.old_epoch,
                          seq=next(self._seq), pass_id=header.pass_id)  # fmt: skip
        await self._answer_entry(serving.route.entry, ack, np.zeros((0, self.hidden_size), np.float32))

    async def _answer_entry(self, entry: str, answer: KvAckHeader, array: np.ndarray) -> None:
        """Hand a handoff answer to the entry's pending wait: directly when this node is
        the entry, else as a frame."""
        if entry == self.node:
            self._resolve(Frame(answer, array))
        else:
            await self._send_payload(entry, encode_frame(answer, array))



HANDOFF_STEP = 2**62
"""The frame step that marks a KV handoff (never a real decode step)."""


def _failed(answer: FrameHeader) -> bool:
    """True unless ``answer`` is a handoff answer that reports success."""
    return not isinstance(answer, KvAckHeader) or answer.failed


def _new_owners(new: Serving, node: str, start: int, end: int) -> list[str]:
    """The nodes other than ``node`` that own some of blocks [start, end) in ``new``
    (sorted: the entry and the old node number their answers the same way)."""
    return sorted({new.route.owner_of_block(block) for block in range(start, end)} - {node})


def _split_kv(
    host: SegmentHost, new: Serving, node: str, request_id: str, length: int
) -> dict[str, tuple[tuple[int, ...], np.ndarray]] | None:
    """Compute thread: export this node's K/V of the request; blocks staying here go into
    the new host at once; the rest is returned as one [n, 2, heads, T, dim] array per new
    owner. None when the cache is missing or does not hold ``length`` tokens."""
    exported = host.export_kv(request_id)
    if exported is None or any(k.shape[1] != length for k, _ in exported.values()):
        return None
    by_owner: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for block, kv in sorted(exported.items()):
        by_owner.setdefault(new.route.owner_of_block(block), {})[block] = kv
    mine = by_owner.pop(node, None)
    if mine is not None and new.host is not None and new.host is not host:
        new.host.import_kv(request_id, mine)
    return {
        owner: (tuple(blocks), torch.stack([torch.stack(blocks[b]) for b in blocks]).numpy())
        for owner, blocks in by_owner.items()
    }
