"""The worker's data plane: activation frames in, segment compute, frames out.

A frame's header names its epoch; the `EpochKeeper` says which state serves it (the
committed epoch, or a draining one) and fences the rest. The entry's side of a pass
(`pipeline_pass`) runs the local blocks and waits for the final hidden state of that
(request, step, epoch): each is accepted once, so a duplicated or late frame is counted
and dropped, never used twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from itertools import count

import numpy as np

from services.worker.compute import ComputeThread, Slowdown
from services.worker.epochs import EpochKeeper, Serving
from services.worker.probes import is_probe
from services.worker.routing import Route
from shared.errors import EdgesplitError, StageTimedOut
from shared.tensor_frame import Frame, FrameHeader, encode_frame

log = logging.getLogger(__name__)


class FrameRefused(EdgesplitError):
    """A frame this worker will not act on (bad target, shape or position)."""


class DataPlane:
    """Frames of one worker. ``send(destination, payload)`` is the (shaped) egress."""

    def __init__(
        self,
        node: str,
        hidden_size: int,
        keeper: EpochKeeper,
        compute: ComputeThread,
        slowdown: Slowdown,
        send: Callable[[str, bytes], Awaitable[None]],
        stage_timeout_s: float,
    ) -> None:
        self.node = node
        self.hidden_size = hidden_size
        self.keeper = keeper
        self.compute = compute
        self.slowdown = slowdown
        self._send_payload = send
        self.stage_timeout_s = stage_timeout_s
        self.counters: Counter[str] = Counter()
        self._seq = count()
        self._pending: dict[tuple[str, int, int], asyncio.Future[np.ndarray]] = {}

    async def on_frame(self, frame: Frame) -> None:
        """Handle one received frame (raises FrameRefused for a bad one)."""
        header = frame.header
        if is_probe(frame):
            return  # the prober has its own subscription
        serving = self.keeper.for_frame(header.epoch, time.monotonic())
        if serving is None:
            self.counters["frames_fenced"] += 1
            return
        route, host = serving.route, serving.host
        target = header.extra.get("target")
        if not isinstance(target, int) or isinstance(target, bool):
            raise FrameRefused("frame has no integer 'target' block")
        if header.extra.get("release") is True:
            if host is not None and target == host.start:
                host.release(header.request_id)
                if host.end < route.num_layers:
                    await self._send(route, header, frame.array, host.end)
            return
        if target == route.num_layers:
            future = self._pending.pop((header.request_id, header.step, header.epoch), None)
            if future is None or future.done():
                self.counters["results_unexpected"] += 1  # a duplicate or a late one
            else:
                future.set_result(frame.array)
            return
        if host is None or target != host.start:
            raise FrameRefused(f"frame for block {target}, but this node runs "
                               f"{route.segment_of(self.node)} in epoch {route.epoch}")  # fmt: skip
        position = header.extra.get("pos", 0)
        self._check_activation(frame.array, position)
        hidden = await self.compute.run(host.forward, header.request_id, frame.array, position, self.slowdown)
        if host.end == route.num_layers and header.extra.get("last_only") is True:
            hidden = hidden[-1:]
        await self._send(route, header, hidden, host.end)

    def _check_activation(self, array: np.ndarray, position: object) -> None:
        hidden = self.hidden_size
        if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != hidden or not array.shape[0]:
            raise FrameRefused(f"activation must be float32 [T, {hidden}], got {array.dtype}{list(array.shape)}")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise FrameRefused(f"frame position {position!r} is not a non-negative integer")

    async def _send(self, route: Route, header: FrameHeader, array: np.ndarray, target: int) -> None:
        extra = {**header.extra, "target": target, "src": self.node, "sent_at": time.time()}
        out = FrameHeader(request_id=header.request_id, step=header.step, epoch=route.epoch,
                          seq=next(self._seq), extra=extra)  # fmt: skip
        await self._send_payload(route.node_for(target), encode_frame(out, array))

    async def pipeline_pass(
        self, request_id: str, step: int, token_ids: np.ndarray, position: int, last_only: bool
    ) -> tuple[np.ndarray, int]:
        """Entry side of one pass under the committed epoch: embed, run local blocks, send
        on, await the final state. Returns (hidden, epoch used); StageTimedOut after the
        stage deadline."""
        serving = self.keeper.current
        if serving is None or serving.entry is None:
            raise StageTimedOut(f"node {self.node} is no longer the entry")
        route = serving.route
        hidden = await self.compute.run(serving.entry.embed_tokens, token_ids, position)
        target = 0
        while target < route.num_layers and route.node_for(target) == self.node:
            assert serving.host is not None
            hidden = await self.compute.run(serving.host.forward, request_id, hidden, position, self.slowdown)
            target = serving.host.end
        if target == route.num_layers:
            return (hidden[-1:] if last_only else hidden), route.epoch
        key = (request_id, step, route.epoch)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        header = FrameHeader(request_id=request_id, step=step, epoch=route.epoch, seq=0,
                             extra={"pos": position, "last_only": last_only})  # fmt: skip
        try:
            await self._send(route, header, hidden, target)
            async with asyncio.timeout(self.stage_timeout_s):
                return await future, route.epoch
        except TimeoutError:
            raise StageTimedOut(
                f"no result for request {request_id} step {step} within "
                f"{self.stage_timeout_s} s (epoch {route.epoch})"
            ) from None
        finally:
            self._pending.pop(key, None)

    async def release(self, request_id: str) -> None:
        """Tell the committed pipeline to free a finished request's KV caches (best effort)."""
        serving: Serving | None = self.keeper.current
        if serving is None:
            return
        route, host = serving.route, serving.host
        target = 0
        if host is not None and route.node_for(0) == self.node:
            host.release(request_id)
            target = host.end
        if target < route.num_layers:
            header = FrameHeader(request_id=request_id, step=0, epoch=route.epoch, seq=0,
                                 extra={"release": True})  # fmt: skip
            await self._send(route, header, np.zeros((0, self.hidden_size), np.float32), target)
