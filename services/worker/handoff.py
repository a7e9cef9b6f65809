"""Moving a request's KV caches when split points move (the KV handoff).

At a token boundary no frame of the request is in flight, so the entry sends every node
of the old pipeline its handoff frame at once; each sends the K/V of its blocks to their
new owners (or keeps them) and answers the entry; each new owner acknowledges what it
received. `KvHandoff` does this for a worker's `DataPlane` (services/worker/dataplane.py),
which holds it, hands it the handoff and kv frames, and keeps the entry's waits for
answers; the entry replays the request instead when anything is missing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
import torch

from services.worker.compute import ComputeThread, SegmentHost
from services.worker.deadline import StageDeadline
from services.worker.epochs import EpochKeeper, Serving
from services.worker.errors import FrameRefused
from services.worker.frame_checks import FrameLimits, check_kv, require_finite
from shared.frame_headers import FrameHeader, HandoffHeader, KvAckHeader, KvHeader
from shared.ids import NodeId, RequestId
from shared.tensor_frame import Frame, to_torch

WaitKey = tuple[str, int, int]
"""What an entry's wait for an answer is keyed by: (request id, step, epoch)."""
ExpectAnswers = Callable[[Sequence[WaitKey]], tuple[int, list[asyncio.Future[Frame]]]]
"""Register one wait per key under a new pass id; returns (pass id, one future per key)."""
Seal = Callable[[str, FrameHeader, np.ndarray], Awaitable[bytes]]
"""Encode a frame for a destination, authenticated with their pair key in its epoch
(`DataPlane.seal`)."""


class KvHandoff:
    """The KV handoff's side of one worker's data plane.

    ``node``: this worker; ``limits``: the model numbers a kv frame is checked against
    (its ``hidden_size`` is the width of the empty answer frames); ``keeper``:
    the epochs that serve frames; ``compute``: the thread that splits and imports K/V;
    ``deadline``: the stage deadline (a handoff waits about one pass); ``send(node,
    payload)``: the (shaped) egress; ``expect``/``forget``/``resolve``: the entry's waits
    for answers, kept by the data plane (register, drop, accept one answer); ``down``: the
    nodes known to be down (read only here); ``seq``: the frame sequence numbers the data
    plane numbers its frames with; ``counters``: the data plane's counters; ``seal``:
    encodes a frame with its epoch's MAC.
    """

    def __init__(
        self,
        node: str,
        limits: FrameLimits,
        keeper: EpochKeeper,
        compute: ComputeThread,
        deadline: StageDeadline,
        send: Callable[[str, bytes], Awaitable[None]],
        expect: ExpectAnswers,
        forget: Callable[[Sequence[WaitKey]], None],
        resolve: Callable[[Frame], None],
        down: AbstractSet[str],
        seq: Iterator[int],
        counters: Counter[str],
        seal: Seal,
    ) -> None:
        self.node = node
        self.limits = limits
        self.hidden_size = limits.hidden_size
        self.keeper = keeper
        self.compute = compute
        self.deadline = deadline
        self.counters = counters
        self.down = down
        self._send_payload = send
        self._expect = expect
        self._forget = forget
        self._resolve = resolve
        self._seq = seq
        self._seal = seal

    async def move(self, request_id: str, old_epoch: int, length: int) -> bool:
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
        if not self.down.isdisjoint(old.route.nodes()):
            return False  # the old pipeline lost a node: its caches are gone, replay
        holders = [(node, segment) for node in old.route.nodes()
                   if (segment := old.route.segment_of(node)) is not None]  # fmt: skip
        moves = [len(_new_owners(new, node, start, end)) for node, (start, end) in holders]
        bases = [HANDOFF_STEP + len(holders) + sum(moves[:index]) for index in range(len(holders))]
        keys = [(request_id, HANDOFF_STEP + index, old_epoch) for index in range(len(holders) + sum(moves))]
        pass_id, futures = self._expect(keys)
        empty = np.zeros((0, self.hidden_size), np.float32)
        try:
            for (node, (start, _)), key, base in zip(holders, keys, bases, strict=False):
                header = HandoffHeader(request_id=RequestId(request_id), step=key[1], epoch=old_epoch, seq=0,
                                       target=start, pos=length, new_epoch=new.epoch, pass_id=pass_id,
                                       ack_base=base, src=NodeId(self.node))  # fmt: skip
                if node == self.node:
                    await self.on_handoff(header, empty, old)
                else:
                    await self._send_payload(node, await self._seal(node, header, empty))
            async with asyncio.timeout(self.deadline.timeout_s(1)):  # about one pass; then replay
                for answered in asyncio.as_completed(futures):
                    if _failed((await answered).header):
                        return False
            return True
        except TimeoutError:
            return False
        finally:
            self._forget(keys)

    async def on_handoff(self, header: HandoffHeader, array: np.ndarray, old: Serving) -> None:
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
                               old_epoch=route.epoch, pass_id=header.pass_id, src=NodeId(self.node))  # fmt: skip
                await self._send_payload(owner, await self._seal(owner, out, tensor))
        answer = KvAckHeader(request_id=header.request_id, step=header.step, epoch=route.epoch,
                             seq=next(self._seq), pass_id=header.pass_id, failed=failed,
                             src=NodeId(self.node))  # fmt: skip
        await self._answer_entry(route.entry, answer, array)

    async def on_kv(self, header: KvHeader, array: np.ndarray, serving: Serving) -> None:
        """A new owner's side: import the K/V of ``header.blocks`` (on the compute thread),
        then acknowledge. Raises FrameRefused, before anything is imported, for a frame
        whose dtype, shape, token count or blocks do not fit this node's segment, or whose
        values are not all finite."""
        host = serving.host
        if host is None:
            raise FrameRefused(f"a kv frame for request {header.request_id}, but this node runs "
                               f"no segment in epoch {serving.epoch}")  # fmt: skip
        check_kv(header, array, self.limits, host.start, host.end)
        await self.compute.run(_import_kv, host, header, array)
        self.counters["kv_blocks_received"] += len(header.blocks)
        self.counters["kv_bytes_received"] += int(array.nbytes)
        ack = KvAckHeader(request_id=header.request_id, step=header.ack_step, epoch=header.old_epoch,
                          seq=next(self._seq), pass_id=header.pass_id, src=NodeId(self.node))  # fmt: skip
        await self._answer_entry(serving.route.entry, ack, np.zeros((0, self.hidden_size), np.float32))

    async def _answer_entry(self, entry: str, answer: KvAckHeader, array: np.ndarray) -> None:
        """Hand a handoff answer to the entry's pending wait: directly when this node is
        the entry, else as a frame."""
        if entry == self.node:
            self._resolve(Frame(answer, array))
        else:
            await self._send_payload(entry, await self._seal(entry, answer, array))


HANDOFF_STEP = 2**62
"""The frame step that marks a KV handoff (never a real decode step)."""


def _failed(answer: FrameHeader) -> bool:
    """True unless ``answer`` is a handoff answer that reports success."""
    return not isinstance(answer, KvAckHeader) or answer.failed


def _new_owners(new: Serving, node: str, start: int, end: int) -> list[str]:
    """The nodes other than ``node`` that own some of blocks [start, end) in ``new``
    (sorted: the entry and the old node number their answers the same way)."""
    return sorted({new.route.owner_of_block(block) for block in range(start, end)} - {node})


def _import_kv(host: SegmentHost, header: KvHeader, array: np.ndarray) -> None:
    """Compute thread: refuse K/V that is not all finite, else copy it into ``host``."""
    require_finite("kv", array)
    tensor = to_torch(np.ascontiguousarray(array))
    host.import_kv(header.request_id, {block: (tensor[i, 0], tensor[i, 1])
                                       for i, block in enumerate(header.blocks)})  # fmt: skip


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
