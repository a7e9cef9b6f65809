"""The worker's data plane: activation frames in, segment compute, frames out.

A frame's header names its epoch; the `EpochKeeper` says which state serves it (the
committed epoch, or a draining one) and fences the rest. The entry's side of a pass
(`pipeline_pass`) runs the local blocks and waits for the final hidden state of that
(request, step, epoch): each is accepted once, so a duplicated or late frame is counted
and dropped, never used twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from itertools import count

import numpy as np

from services.worker.compute import ComputeThread, KvMissing, Slowdown
from services.worker.deadline import StageDeadline
from services.worker.epochs import EpochKeeper, Serving
from services.worker.errors import FrameRefused, NodeLost, NoPlan
from services.worker.handoff import KvHandoff, WaitKey
from services.worker.probes import is_probe
from shared.errors import StageTimedOut
from shared.ids import RequestId
from shared.planning.route import Route
from shared.tensor_frame import Frame, FrameHeader, encode_frame

log = logging.getLogger(__name__)
__all__ = ["DataPlane", "FrameRefused", "NoPlan", "NodeLost"]


class DataPlane:
    """Frames of one worker. ``send(destination, payload)`` is the (shaped) egress; the
    KV handoff (``handoff``) is its collaborator for handoff and kv frames."""

    def __init__(
        self,
        node: str,
        hidden_size: int,
        keeper: EpochKeeper,
        compute: ComputeThread,
        slowdown: Slowdown,
        send: Callable[[str, bytes], Awaitable[None]],
        stage_timeout_s: float,
        deadline: StageDeadline | None = None,
    ) -> None:
        self.node = node
        self.hidden_size = hidden_size
        self.keeper = keeper
        self.compute = compute
        self.slowdown = slowdown
        self._send_payload = send
        self.stage_timeout_s = stage_timeout_s
        self.deadline = deadline or StageDeadline(stage_timeout_s)
        self.counters: Counter[str] = Counter()
        self._seq = count()
        self._pending: dict[WaitKey, tuple[int, asyncio.Future[Frame]]] = {}
        self._epoch_of: dict[str, int] = {}  # request -> newest epoch of its frames here (bounded)
        self._seen: dict[tuple[object, ...], None] = {}  # insertion-ordered, bounded
        self._pass_ids = count(1)
        self.down: set[str] = set()
        """Nodes known to be down (Last Will, or the monitor's NodeDown)."""
        self._announced: dict[str, float] = {}  # node -> when it last announced itself (Unix s)
        self._reconnected_at: float | None = None
        self._announcements = asyncio.Event()  # replaced (and the old one set) on each
        self.handoff = KvHandoff(node, hidden_size, keeper, compute, self.deadline, send,
                                 self._expect_answers, self._forget_answers, self._resolve,
                                 self.down, self._seq, self.counters)  # fmt: skip

    def _seen_before(self, header: FrameHeader) -> bool:
        """True for a frame already handled: same request, pass, epoch and hop target."""
        pass_id = header.extra.get("pass")
        if pass_id is None:
            return False
        key = (header.request_id, header.step, header.epoch, pass_id, header.extra.get("target"),
               header.extra.get("kind"))  # fmt: skip
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > SEEN_FRAMES:
            self._seen.pop(next(iter(self._seen)))
        return False

    def node_down(self, node: str) -> int:
        """Fail every pending pass whose epoch's pipeline runs through ``node``; returns
        how many. The entry then waits for a new epoch and replays."""
        self.down.add(node)
        failed = 0
        for (request_id, _step, epoch), (_, future) in list(self._pending.items()):
            serving = self.keeper.for_frame(epoch, time.monotonic())
            if serving is not None and node not in serving.route.nodes():
                continue
            if not future.done():
                future.set_exception(NodeLost(f"node {node} went down under request "
                                              f"{request_id} (epoch {epoch})"))  # fmt: skip
                failed += 1
        return failed

    def reconnected(self, lost_at_s: float) -> int:
        """The bus came back after losing the broker at ``lost_at_s`` (Unix s): frames in
        flight were likely lost, so every pending pass fails now (the entry replays it)
        instead of at its deadline. Returns how many."""
        self._reconnected_at = lost_at_s
        failed = 0
        for (request_id, step, epoch), (_, future) in list(self._pending.items()):
            if not future.done():
                future.set_exception(StageTimedOut(f"the broker connection was lost under request "
                                                   f"{request_id} step {step} (epoch {epoch})"))  # fmt: skip
                failed += 1
        return failed

    def node_up(self, node: str, announced_at_s: float | None = None) -> None:
        """``node`` is up; ``announced_at_s``: when it published its online status (Unix s)."""
        self.down.discard(node)
        if announced_at_s is not None:
            self._announced[node] = announced_at_s
            announced, self._announcements = self._announcements, asyncio.Event()
            announced.set()

    async def _after_reconnect(self, route: Route) -> None:
        """After a broker restart, wait (at most the deadline's floor) until every node of
        ``route`` has announced itself again, i.e. reconnected and resubscribed: a frame
        sent before that is dropped by the broker and costs a pass deadline."""
        since = self._reconnected_at
        if since is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.deadline.floor_s):
                while any(
                    self._announced.get(n, 0.0) < since for n in route.nodes() if n != self.node
                ):
                    await self._announcements.wait()
        if self._reconnected_at == since:
            self._reconnected_at = None

    async def on_frame(self, frame: Frame) -> None:
        """Handle one received frame (raises FrameRefused for a bad one)."""
        header = frame.header
        if is_probe(frame):
            return  # the prober has its own subscription
        serving = self.keeper.for_frame(header.epoch, time.monotonic())
        if serving is None:
            self.counters["frames_fenced"] += 1
            return
        if self._seen_before(header):
            self.counters["frames_duplicate"] += 1  # QoS redelivery or a duplicating link
            return
        route, host = serving.route, serving.host
        target = header.extra.get("target")
        if not isinstance(target, int) or isinstance(target, bool):
            raise FrameRefused("frame has no integer 'target' block")
        kind = header.extra.get("kind")
        if kind == "handoff":
            await self.handoff.on_handoff(frame, serving)
            return
        if kind == "kv":
            await self.handoff.on_kv(frame, serving)
            return
        if header.extra.get("release") is True:
            if host is not None and target == host.start:
                host.release(header.request_id)
                if host.end < route.num_layers:
                    await self._send(route, header, frame.array, host.end)
            return
        if target == route.num_layers:
            self._resolve(frame)
            return
        if self._superseded(header):
            self.counters["frames_fenced"] += 1  # a late frame of an epoch this request left
            return
        if host is None or target != host.start:
            raise FrameRefused(f"frame for block {target}, but this node runs "
                               f"{route.segment_of(self.node)} in epoch {route.epoch}")  # fmt: skip
        position = header.extra.get("pos", 0)
        self._check_activation(frame.array, position)
        try:
            hidden = await self.compute.run(
                host.forward, header.request_id, frame.array, position, self.slowdown
            )
        except KvMissing as error:
            self.counters["kv_missing"] += 1
            log.info("%s: %s; asking the entry to replay", self.node, error)
            await self._send_result(route, header, {"kv_missing": True})
            return
        if host.end == route.num_layers and header.extra.get("last_only") is True:
            hidden = hidden[-1:]
        await self._send(route, header, hidden, host.end)

    def _superseded(self, header: FrameHeader) -> bool:
        """True for an activation of an older epoch than one this request already ran in
        here: the output of a node that was stuck (SIGSTOP) or cut off, arriving after
        the request moved on. It must not touch the KV cache the new epoch rebuilt."""
        newest = self._epoch_of.get(header.request_id)
        if newest is not None and header.epoch < newest:
            return True
        if newest is None or header.epoch > newest:
            self._epoch_of.pop(header.request_id, None)
            self._epoch_of[header.request_id] = header.epoch
            if len(self._epoch_of) > SEEN_FRAMES:
                self._epoch_of.pop(next(iter(self._epoch_of)))
        return False

    def _resolve(self, frame: Frame) -> None:
        """A final state (or a handoff answer) for the entry: accept it once, and only
        from the pass that waits for it (not a late answer of an earlier try)."""
        header = frame.header
        key = (header.request_id, header.step, header.epoch)
        waiting = self._pending.get(key)
        if waiting is None or waiting[1].done() or header.extra.get("pass") != waiting[0]:
            self.counters["results_unexpected"] += 1  # a duplicate or a late one
            return
        del self._pending[key]
        waiting[1].set_result(frame)

    def _expect_answers(self, keys: Sequence[WaitKey]) -> tuple[int, list[asyncio.Future[Frame]]]:
        """Wait for one answer per key under a new pass id (`_resolve` accepts them)."""
        loop, pass_id = asyncio.get_running_loop(), next(self._pass_ids)
        futures: list[asyncio.Future[Frame]] = [loop.create_future() for _ in keys]
        self._pending.update({key: (pass_id, future) for key, future in zip(keys, futures, strict=True)})
        return pass_id, futures

    def _forget_answers(self, keys: Sequence[WaitKey]) -> None:
        for key in keys:
            self._pending.pop(key, None)

    async def _send_result(self, route: Route, header: FrameHeader, extra: dict[str, bool]) -> None:
        """An empty result straight to the entry, e.g. to say the KV cache is missing."""
        out = FrameHeader(request_id=header.request_id, step=header.step, epoch=route.epoch, seq=next(self._seq),
                          extra={**extra, "target": route.num_layers, "pass": header.extra.get("pass", 0)})  # fmt: skip
        await self._send_payload(
            route.entry, encode_frame(out, np.zeros((0, self.hidden_size), np.float32))
        )

    def _check_activation(self, array: np.ndarray, position: object) -> None:
        hidden = self.hidden_size
        if (
            array.dtype != np.float32
            or array.ndim != 2
            or array.shape[1] != hidden
            or not array.shape[0]
        ):
            raise FrameRefused(
                f"activation must be float32 [T, {hidden}], got {array.dtype}{list(array.shape)}"
            )
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise FrameRefused(f"frame position {position!r} is not a non-negative integer")

    async def _send(
        self, route: Route, header: FrameHeader, array: np.ndarray, target: int
    ) -> None:
        extra = {**header.extra, "target": target, "src": self.node, "sent_at": time.time()}
        out = FrameHeader(request_id=header.request_id, step=header.step, epoch=route.epoch,
                          seq=next(self._seq), extra=extra)  # fmt: skip
        await self._send_payload(route.node_for(target), encode_frame(out, array))

    async def pipeline_pass(
        self,
        request_id: str,
        step: int,
        token_ids: np.ndarray,
        position: int,
        last_only: bool,
        head: Callable[[], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, int]:
        """Entry side of one pass under the committed epoch: embed, run local blocks, send
        on, await the final state. Returns (hidden, epoch used); StageTimedOut after the
        stage deadline. ``head``, when given, runs first in the same compute job and gives
        the token ids to embed instead of ``token_ids`` (the entry samples the previous
        step's token there: one hand-off to the compute thread per decode step)."""
        serving = self.keeper.current
        if serving is None or serving.entry is None:
            raise StageTimedOut(f"node {self.node} is no longer the entry")
        route = serving.route
        local_blocks = route.node_for(0) == self.node and serving.host is not None
        # One hand-off to the compute thread for the embedding and the entry's own blocks.
        token_ids, hidden = await self.compute.run(_embed_and_run, serving, request_id, token_ids, position,
                                                   self.slowdown if local_blocks else None, head)  # fmt: skip
        target = serving.host.end if local_blocks and serving.host is not None else 0
        while target < route.num_layers and route.node_for(target) == self.node:
            assert serving.host is not None
            hidden = await self.compute.run(
                serving.host.forward, request_id, hidden, position, self.slowdown
            )
            target = serving.host.end
        if target == route.num_layers:
            return (hidden[-1:] if last_only else hidden), route.epoch
        key = (request_id, step, route.epoch)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        pass_id = next(self._pass_ids)
        self._pending[key] = (pass_id, future)
        header = FrameHeader(request_id=RequestId(request_id), step=step, epoch=route.epoch, seq=0,
                             extra={"pos": position, "last_only": last_only, "pass": pass_id})  # fmt: skip
        tokens, began = int(token_ids.shape[0]), time.monotonic()
        timeout_s = self.deadline.timeout_s(tokens)
        try:
            await self._after_reconnect(route)
            lost = sorted(self.down.intersection(route.nodes()))
            if lost:  # known down before the frame left: fail over now, not at the deadline
                raise NodeLost(
                    f"node {lost[0]} is down under request {request_id} (epoch {route.epoch})"
                )
            await self._send(route, header, hidden, target)
            async with asyncio.timeout(timeout_s):
                result = await future
            if result.header.extra.get("kv_missing") is True:
                raise KvMissing(f"request {request_id} step {step}: a node of epoch "
                                f"{route.epoch} lacks its KV cache")  # fmt: skip
            self.deadline.observe(tokens, time.monotonic() - began)
            return result.array, route.epoch
        except TimeoutError:
            self.counters["passes_timed_out"] += 1
            raise StageTimedOut(
                f"no result for request {request_id} step {step} within "
                f"{timeout_s:.1f} s (epoch {route.epoch})"
            ) from None
        finally:
            if self._pending.get(key, (None,))[0] == pass_id:
                del self._pending[key]

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
            header = FrameHeader(request_id=RequestId(request_id), step=0, epoch=route.epoch, seq=0,
                                 extra={"release": True})  # fmt: skip
            await self._send(route, header, np.zeros((0, self.hidden_size), np.float32), target)


SEEN_FRAMES = 8192
"""How many handled frames each worker remembers to drop duplicates."""

def _embed_and_run(
    serving: Serving,
    request_id: str,
    token_ids: np.ndarray,
    position: int,
    slowdown: Slowdown | None,
    head: Callable[[], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute thread: (``head`` for the token ids,) embed, then (when ``slowdown`` is
    given) run the entry's first segment on the result. Returns (token ids, hidden)."""
    assert serving.entry is not None
    if head is not None:
        token_ids = head()
    hidden = serving.entry.embed_tokens(token_ids, position)
    if slowdown is None or serving.host is None:
        return token_ids, hidden
    return token_ids, serving.host.forward(request_id, hidden, position, slowdown)
