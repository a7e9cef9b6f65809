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
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from itertools import count

import numpy as np
import torch

from services.worker.batch_frames import OutboundBatches, split_batch
from services.worker.batching import DecodeBatcher, Head, SampleHead, is_decode_step
from services.worker.compute import ComputeThread, KvMissing, Slowdown
from services.worker.deadline import StageDeadline
from services.worker.epochs import EpochKeeper, Serving
from services.worker.errors import FrameRefused, NodeLost, NoPlan
from services.worker.frame_auth import FrameAuth
from services.worker.frame_checks import FrameLimits, check_frame, duplicate_key
from services.worker.handoff import KvHandoff, WaitKey
from services.worker.kv_budget import KvOverBudget
from shared.errors import StageTimedOut
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
from shared.ids import NodeId, RequestId
from shared.planning.route import Route
from shared.security.frame_keys import PeerKeys
from shared.tensor_frame import Frame, compress_activation, decompress_activation

log = logging.getLogger(__name__)
__all__ = ["DataPlane", "FrameLimits", "FrameRefused", "NoPlan", "NodeLost"]


class DataPlane:
    """Frames of one worker. ``limits``: the model numbers every received frame is
    checked against (services/worker/frame_checks.py); ``send(destination, payload)`` is
    the (shaped) egress; the KV handoff (``handoff``) is its collaborator for handoff and
    kv frames; ``peers``: this node's frame key and its peers' (a new key when None)."""

    def __init__(
        self,
        node: str,
        limits: FrameLimits,
        keeper: EpochKeeper,
        compute: ComputeThread,
        slowdown: Slowdown,
        send: Callable[[str, bytes], Awaitable[None]],
        stage_timeout_s: float,
        deadline: StageDeadline | None = None,
        peers: PeerKeys | None = None,
    ) -> None:
        self.node = node
        self.limits = limits
        self.hidden_size = limits.hidden_size
        self.keeper = keeper
        self.compute = compute
        self.slowdown = slowdown
        self._send_payload = send
        self.stage_timeout_s = stage_timeout_s
        self.deadline = deadline or StageDeadline(stage_timeout_s)
        self.counters: Counter[str] = Counter()
        self._seq = count()
        self._pending: dict[WaitKey, tuple[int, asyncio.Future[Frame]]] = {}
        self._result_rows: dict[WaitKey, tuple[int, int]] = {}  # (pass id, rows of its result)
        self._epoch_of: dict[str, int] = {}  # request -> newest epoch of its frames here (bounded)
        self._seen: dict[tuple[object, ...], None] = {}  # insertion-ordered, bounded
        self.activation_precision = "fp32"
        """How this node's activation frames travel (shared/tensor_frame.py: fp32, fp16, int8)."""
        self.withheld: Callable[[Route, tuple[int, int]], str | None] | None = None
        """The privacy guard's `refusal`: a segment the policy in force forbids here is not run."""
        self.down: set[str] = set()
        """Nodes known to be down (Last Will, or the monitor's NodeDown)."""
        self._announced: dict[str, float] = {}  # node -> when it last announced itself (Unix s)
        self._reconnected_at: float | None = None
        self._announcements = asyncio.Event()  # replaced (and the old one set) on each
        self.batcher = DecodeBatcher(compute, slowdown, self.counters)
        """Decode steps of different requests at this stage run as one batched forward."""
        self.auth = FrameAuth(node, keeper, self.counters, peers or PeerKeys(node))
        self.seal = self.auth.seal
        self.batches = OutboundBatches(self.seal, send, self._seq, self.counters)
        """Decode steps leaving for the same next hop in the same turn go as one batch frame."""
        self.handoff = KvHandoff(node, limits, keeper, compute, self.deadline, send,
                                 self._expect_answers, self._forget_answers, self._resolve,
                                 self.down, self._seq, self.counters, self.seal)  # fmt: skip

    def _seen_before(self, key: tuple[object, ...] | None) -> bool:
        """True for a frame already handled (``key``: `duplicate_key`; None: never a
        duplicate); else remembers it."""
        if key is None:
            return False
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

    async def open_batch(self, frame: Frame) -> list[Frame]:
        """A received batch frame (batch_frames.py) as one activation or result frame per
        row, to hand to `on_frame` with ``trusted``; empty when the frame's epoch is fenced
        or it does not authenticate (counted as ``frames_fenced``, ``frames_forged``).

        Raises FrameRefused (counted as ``frames_refused`` and ``batched_frames_refused``)
        for a frame whose tensor does not fit its rows or the model.
        """
        header = frame.header
        if not isinstance(header, BatchHeader):
            return [frame]
        serving = self.keeper.for_frame(header.epoch, time.monotonic())
        if serving is None:
            self.counters["frames_fenced"] += 1
            return []
        try:
            check_frame(header, frame.array, self.limits)
        except FrameRefused:
            self.counters["frames_refused"] += 1
            self.counters["batched_frames_refused"] += 1
            raise
        if not await self.auth.authentic(header, frame.array, serving):
            return []
        self.counters["batched_frames_received"] += 1
        self.counters["batched_frames_received_rows"] += len(header.rows)
        return split_batch(header, frame.array)

    async def on_frame(self, frame: Frame, trusted: bool = False) -> None:
        """Handle one received frame (``trusted``: a row of a batch frame that
        authenticated as a whole, `open_batch`).

        Raises FrameRefused (counted as ``frames_refused``) for one this node cannot run:
        a layout, position or token count that does not fit the model, a value that is
        not finite, a block it does not run. A frame that does not authenticate (no or a
        bad MAC, a sender the plan does not name for that hop: frame_auth.py) is dropped
        and counted as ``frames_forged``. A frame is checked before it is remembered as
        seen, and forgotten when refused later, so a corrupt or forged copy cannot shadow
        the genuine frame.
        """
        header = frame.header
        if isinstance(header, ProbeHeader):
            return  # the prober has its own subscription
        serving = self.keeper.for_frame(header.epoch, time.monotonic())
        if serving is None:
            self.counters["frames_fenced"] += 1
            return
        key, remembered = duplicate_key(header), False
        try:
            self._check(header, frame.array)
            if isinstance(header, BatchHeader):
                raise FrameRefused("a batch frame must be opened first (open_batch)")
            if not trusted and not await self.auth.authentic(header, frame.array, serving):
                return
            if self._seen_before(key):
                self.counters["frames_duplicate"] += 1  # QoS redelivery or a duplicating link
                return
            remembered = True
            match header:
                case ActivationHeader():
                    await self._on_activation(header, frame.array, serving)
                case ResultHeader() | KvAckHeader():
                    self._resolve(frame)
                case ReleaseHeader():
                    await self._on_release(header, frame.array, serving)
                case HandoffHeader():
                    await self.handoff.on_handoff(header, frame.array, serving)
                case KvHeader():
                    await self.handoff.on_kv(header, frame.array, serving)
        except FrameRefused:
            self.counters["frames_refused"] += 1
            if remembered and key is not None:
                self._seen.pop(key, None)
            raise

    def _check(self, header: FrameHeader, array: np.ndarray) -> None:
        """What needs no compute (frame_checks.py), and a result's rows against its pass.
        Raises FrameRefused."""
        check_frame(header, array, self.limits)
        if isinstance(header, ResultHeader) and not header.kv_missing:
            pass_id, rows = self._result_rows.get((header.request_id, header.step, header.epoch), (-1, 0))
            if pass_id == header.pass_id and array.shape[0] != rows:
                raise FrameRefused(f"result for request {header.request_id} step {header.step} has "
                                   f"{array.shape[0]} rows; its pass expects {rows}")  # fmt: skip

    async def _on_activation(self, header: ActivationHeader, array: np.ndarray, serving: Serving) -> None:
        """Run this node's segment on an activation and send the output on."""
        route, host = serving.route, serving.host
        if self._superseded(header):
            self.counters["frames_fenced"] += 1  # a late frame of an epoch this request left
            return
        if host is None or header.target != host.start:
            raise FrameRefused(f"frame for block {header.target}, but this node runs "
                               f"{route.segment_of(self.node)} in epoch {route.epoch}")  # fmt: skip
        why = self.withheld(route, (host.start, host.end)) if self.withheld is not None else None
        if why is not None:  # the entry's pass times out and retries under the next plan
            self.counters["frames_withheld_privacy"] += 1
            log.warning("%s: request %s not run here: %s", self.node, header.request_id, why)
            return
        array = decompress_activation(array, self.hidden_size)  # O(bytes); fp32 as it is
        try:
            if is_decode_step(header, array.shape[0]):  # batched with other requests' steps
                hidden = await self.batcher.forward((route.epoch, host), header.request_id,
                                                    header.pos, lambda _: array)  # fmt: skip
            else:  # prefill runs alone (batching.py says why)
                hidden = await self.compute.run(
                    host.forward, header.request_id, array, header.pos, self.slowdown
                )
        except KvMissing as error:
            self.counters["kv_missing"] += 1
            log.info("%s: %s; asking the entry to replay", self.node, error)
            await self._send_kv_missing(route, header)
            return
        except KvOverBudget as error:  # nothing grew: the request fails, the others go on
            self.counters["kv_over_budget"] += 1
            log.info("%s: %s; the request fails as overloaded", self.node, error)
            await self._send_kv_missing(route, header, over_budget=True)
            return
        if host.end == route.num_layers and header.last_only:
            hidden = hidden[-1:]
        await self._send(route, header, hidden, host.end)

    async def _on_release(self, header: ReleaseHeader, array: np.ndarray, serving: Serving) -> None:
        """Free the request's KV cache here and pass the release on down the pipeline."""
        route, host = serving.route, serving.host
        if host is not None and header.target == host.start:
            host.release(header.request_id)
            if host.end < route.num_layers:
                await self._send(route, header, array, host.end)

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
        pass_id = header.pass_id if isinstance(header, ResultHeader | KvAckHeader) else None
        if waiting is None or waiting[1].done() or pass_id != waiting[0]:
            self.counters["results_unexpected"] += 1  # a duplicate or a late one
            return
        del self._pending[key]
        waiting[1].set_result(frame)

    def _expect_answers(self, keys: Sequence[WaitKey]) -> tuple[int, list[asyncio.Future[Frame]]]:
        """Wait for one answer per key under a new pass id (`_resolve` accepts them)."""
        loop, pass_id = asyncio.get_running_loop(), new_pass_id()
        futures: list[asyncio.Future[Frame]] = [loop.create_future() for _ in keys]
        self._pending.update({key: (pass_id, future) for key, future in zip(keys, futures, strict=True)})
        return pass_id, futures

    def _forget_answers(self, keys: Sequence[WaitKey]) -> None:
        for key in keys:
            self._pending.pop(key, None)

    async def _send_kv_missing(self, route: Route, header: ActivationHeader, over_budget: bool = False) -> None:
        """An empty result straight to the entry, to say this node lacks the KV cache (or,
        ``over_budget``, cannot grow it within its KV budget)."""
        out = ResultHeader(request_id=header.request_id, step=header.step, epoch=route.epoch,
                           seq=next(self._seq), pass_id=header.pass_id, kv_missing=True,
                           src=NodeId(self.node), sent_at=time.time(), kv_over_budget=over_budget)  # fmt: skip
        await self._send_payload(route.entry, await self.seal(route.entry, out, np.zeros((0, self.hidden_size), np.float32)))

    async def _send(
        self, route: Route, header: ActivationHeader | ReleaseHeader, array: np.ndarray, target: int
    ) -> None:
        """Send ``array`` on to the node whose segment starts at block ``target`` under
        ``route``: an activation (a result for the entry when ``target`` is the layer
        count) or a release, stamped with this node and the send time (Unix s)."""
        request_id, step, epoch, seq = header.request_id, header.step, route.epoch, next(self._seq)
        src, sent_at = NodeId(self.node), time.time()
        out: FrameHeader
        if isinstance(header, ReleaseHeader):
            out = ReleaseHeader(request_id=request_id, step=step, epoch=epoch, seq=seq, src=src,
                                sent_at=sent_at, target=target)  # fmt: skip
        else:
            if target == route.num_layers:
                out = ResultHeader(request_id=request_id, step=step, epoch=epoch, seq=seq, src=src,
                                   sent_at=sent_at, pass_id=header.pass_id)  # fmt: skip
            else:
                out = ActivationHeader(request_id=request_id, step=step, epoch=epoch, seq=seq, src=src,
                                       sent_at=sent_at, target=target, pos=header.pos,
                                       last_only=header.last_only, pass_id=header.pass_id)  # fmt: skip
            # The plan's precision for this hop (docs/ARCHITECTURE.md), else this worker's own
            # for activations (a result goes back exact unless the plan says otherwise).
            own = "fp32" if target == route.num_layers else self.activation_precision
            precision = route.activations_for(target) or own
            array = compress_activation(array, precision)
            self.counters[f"activation_frames_{precision}"] += 1
            if is_decode_step(header, array.shape[0]):  # may travel with other requests' steps
                await self.batches.send(route.node_for(target), out, array, target)
                return
        destination = route.node_for(target)
        await self._send_payload(destination, await self.seal(destination, out, array))

    async def pipeline_pass(
        self,
        request_id: str,
        step: int,
        token_ids: np.ndarray,
        position: int,
        last_only: bool,
        head: SampleHead | None = None,
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
        if local_blocks and position > 0 and (head is not None or token_ids.shape[0] == 1):
            # a decode step: sampled, embedded and run through the entry's blocks in one
            # batched compute job with the other requests' steps (batching.py)
            assert serving.host is not None and serving.entry is not None
            entry, ids = serving.entry, token_ids

            def embedded(logits: torch.Tensor | None) -> np.ndarray:
                return entry.embed_tokens(head(logits) if head is not None else ids, position)

            head_input = Head(entry.head_logits, head.head_input()) if head is not None else None
            hidden = await self.batcher.forward((route.epoch, serving.host), request_id, position,
                                                embedded, head_input)  # fmt: skip
            token_ids = np.zeros(1, np.int64)  # one token: only its count matters below
        else:  # one hand-off to the compute thread for the embedding and the entry's own blocks
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
        pass_id = new_pass_id()
        self._pending[key] = (pass_id, future)
        self._result_rows[key] = (pass_id, 1 if last_only else int(token_ids.shape[0]))
        header = ActivationHeader(request_id=RequestId(request_id), step=step, epoch=route.epoch, seq=0,
                                  target=target, pos=position, last_only=last_only, pass_id=pass_id)  # fmt: skip
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
            if isinstance(result.header, ResultHeader) and result.header.kv_over_budget:
                raise KvOverBudget(f"request {request_id} step {step}: a node of epoch {route.epoch} "
                                   "has no KV budget left for it")  # fmt: skip
            if isinstance(result.header, ResultHeader) and result.header.kv_missing:
                raise KvMissing(f"request {request_id} step {step}: a node of epoch "
                                f"{route.epoch} lacks its KV cache")  # fmt: skip
            self.deadline.observe(tokens, time.monotonic() - began)
            return decompress_activation(result.array, self.hidden_size), route.epoch
        except TimeoutError:
            self.counters["passes_timed_out"] += 1
            raise StageTimedOut(
                f"no result for request {request_id} step {step} within "
                f"{timeout_s:.1f} s (epoch {route.epoch})"
            ) from None
        finally:
            if self._pending.get(key, (None,))[0] == pass_id:
                del self._pending[key]
            if self._result_rows.get(key, (None,))[0] == pass_id:
                del self._result_rows[key]

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
            header = ReleaseHeader(request_id=RequestId(request_id), step=0, epoch=route.epoch, seq=0,
                                   target=target)  # fmt: skip
            await self._send(route, header, np.zeros((0, self.hidden_size), np.float32), target)


SEEN_FRAMES = 8192
"""How many handled frames each worker remembers to drop duplicates."""


def new_pass_id() -> int:
    """A random pass id in [1, 2**63): a forged result or kv_ack cannot guess the pass it
    would have to answer (pass ids were a visible counter)."""
    return secrets.randbits(63) or 1


def _embed_and_run(
    serving: Serving,
    request_id: str,
    token_ids: np.ndarray,
    position: int,
    slowdown: Slowdown | None,
    head: SampleHead | None,
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
