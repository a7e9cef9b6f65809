"""The worker service: one emulated edge node hosting a segment of the model.

It announces itself (retained birth status + Last Will), follows the retained plan,
loads only its segment's shards (sha256-verified) on its compute thread, runs the
activation frames addressed to it and forwards them to the next node through the
emulated egress shaper. The node the plan names as entry also serves requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from itertools import count

import numpy as np

from services.worker.compute import ComputeThread, SegmentHost, Slowdown
from services.worker.emulation import Emulation, initial_command
from services.worker.entry import EntryRole
from services.worker.probes import LinkProber, is_probe
from services.worker.routing import Route, route_of
from services.worker.settings import WorkerSettings
from services.worker.shaper import EgressShaper
from services.worker.telemetry import TelemetryReporter
from shared.bus import Announcement, Bus
from shared.errors import EdgesplitError, StageTimedOut
from shared.messages import (
    EmbedRequest,
    EpochReady,
    EpochRejected,
    GenerateRequest,
    Message,
    NodeStatus,
    Plan,
    RequestFailed,
    Segment,
)
from shared.model.runtime import EntryRuntime
from shared.model.shard import ShardStore
from shared.model.tokenizer import TextTokenizer
from shared.tensor_frame import Frame, FrameHeader, encode_frame
from shared.topics import ACTIVATIONS, EPOCH_ACKS, NODE_STATUS, PLAN, REPLIES, REQUESTS

log = logging.getLogger(__name__)


class WorkerService:
    """A worker process's service. Constructor does no I/O; ``run()`` serves until cancelled."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.compute = ComputeThread(settings.threads)
        self.slowdown = Slowdown(settings.slowdown)
        self.shaper = EgressShaper(self._publish_frame)
        self.emulation = Emulation(self.node, self.slowdown, self.shaper.schedule)
        self.emulation.apply(initial_command(settings))  # the same path as run-time commands
        self.prober = LinkProber(self.node, settings, self.shaper.send)
        self.telemetry = TelemetryReporter(self)
        self.store: ShardStore | None = None
        self.route: Route | None = None
        self.host: SegmentHost | None = None
        self.entry: EntryRole | None = None
        self.counters: Counter[str] = Counter()
        self.ready = asyncio.Event()
        """Set once the first plan is loaded and served."""
        self._bus: Bus | None = None
        self._seq = count()
        self._pending: dict[tuple[str, int], asyncio.Future[np.ndarray]] = {}
        self._task_group: asyncio.TaskGroup | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def status(self, state: str = "online") -> NodeStatus:
        segment = self.route.segment_of(self.node) if self.route else None
        return NodeStatus(
            node=self.node,  # type: ignore[arg-type]
            state=state,  # type: ignore[arg-type]
            trust=self.settings.trust,
            memory_bytes=self.settings.memory_bytes,
            threads=self.settings.threads,
            device=self.settings.device,
            capabilities=("gpt2", "llama", "bert"),
            epoch=self.route.epoch if self.route else None,
            segments=(Segment(node=self.node, start=segment[0], end=segment[1]),) if segment else (),  # type: ignore[arg-type]
            entry=bool(self.route and self.route.entry == self.node),
        )

    async def run(self) -> None:
        self.store = await asyncio.to_thread(ShardStore, self.settings.shards_dir)
        birth = Announcement(NODE_STATUS, self.status("online"), {"node": self.node})
        will = Announcement(NODE_STATUS, self.status("offline"), {"node": self.node})
        try:
            async with Bus(self.settings, origin=self.node, birth=birth, will=will) as bus:
                self._bus = bus
                async with asyncio.TaskGroup() as task_group:
                    self._task_group = task_group
                    task_group.create_task(self.shaper.run(), name="shaper")
                    task_group.create_task(self._follow_plans(bus), name="plans")
                    task_group.create_task(self._serve_frames(bus), name="frames")
                    task_group.create_task(self._serve_requests(bus), name="requests")
                    task_group.create_task(self._sweep_caches(), name="sweep")
                    task_group.create_task(self.telemetry.run(bus), name="telemetry")
                    task_group.create_task(self.prober.run(bus), name="probes")
                    task_group.create_task(self.emulation.run(bus), name="emulation")
        finally:
            self.compute.close()

    async def _announce(self) -> None:
        assert self._bus is not None
        status = self.status("online")
        self._bus.set_birth(Announcement(NODE_STATUS, status, {"node": self.node}))
        await self._bus.publish(NODE_STATUS, status, node=self.node)

    # --- plans ----------------------------------------------------------------------------

    async def _follow_plans(self, bus: Bus) -> None:
        async with bus.subscribe(PLAN) as plans:
            async for _, plan in plans:
                try:
                    await self._apply_plan(bus, plan)
                except Exception as error:  # noqa: BLE001 - a bad plan never stops the node
                    if not isinstance(error, EdgesplitError):
                        log.exception("%s: plan epoch %d failed", self.node, plan.epoch)
                    self.counters["plans_refused"] += 1
                    log.warning("%s: refused plan epoch %d: %s", self.node, plan.epoch, error)
                    await bus.publish(
                        EPOCH_ACKS,
                        EpochRejected(epoch=plan.epoch, node=self.node, reason=str(error)[:1024]),  # type: ignore[arg-type]
                        node=self.node,
                    )

    async def _apply_plan(self, bus: Bus, plan: Plan) -> None:
        """Verify, load what this node needs, then switch to the plan's epoch."""
        assert self.store is not None
        if not plan.signature_ok(self.settings.plan_signing_key):
            raise _Refused(f"plan epoch {plan.epoch} has a bad or missing signature")
        if self.route is not None and plan.epoch <= self.route.epoch:
            if plan.epoch < self.route.epoch:
                self.counters["stale_plans"] += 1
            return  # a duplicate or an older epoch: already done or fenced
        route = route_of(plan, self.store.config.num_layers)
        segment = route.segment_of(self.node)
        self._check_privacy(route, segment)
        host = self.host
        if segment is None:
            host = None
        elif host is None or (host.start, host.end) != segment:
            host = await self.compute.run(SegmentHost, self.store, segment[0], segment[1])
        entry = self.entry
        if route.entry == self.node and entry is None:
            entry = await self.compute.run(self._make_entry)
        elif route.entry != self.node:
            entry = None
        self.route, self.host, self.entry = route, host, entry
        if host is not None:
            host.on_forward = self.telemetry.timer.record
        await self._announce()
        await bus.publish(EPOCH_ACKS, EpochReady(epoch=plan.epoch, node=self.node), node=self.node)  # type: ignore[arg-type]
        self.ready.set()
        log.info("%s serving epoch %d: segment %s%s", self.node, plan.epoch, segment,
                 " (entry)" if entry else "")  # fmt: skip

    def _check_privacy(self, route: Route, segment: tuple[int, int] | None) -> None:
        """Refuse a plan that puts the embedding/head or private blocks on this node
        when its trust is below the privacy policy's level."""
        level, trust = self.settings.trusted_level, self.settings.trust
        if trust >= level:
            return
        if route.entry == self.node:
            raise _Refused(
                f"node {self.node} (trust {trust}) cannot be the entry: the embedding and "
                f"head need trust >= {level}"
            )
        if segment is not None and segment[0] < self.settings.private_blocks:
            raise _Refused(
                f"node {self.node} (trust {trust}) cannot run blocks {segment}: blocks "
                f"[0, {self.settings.private_blocks}) need trust >= {level}"
            )

    def _make_entry(self) -> EntryRole:
        assert self.store is not None
        return EntryRole(
            EntryRuntime(self.store, device=self.settings.device),
            TextTokenizer.from_file(self.store.tokenizer_path),
            self.compute.run,
            self._pipeline_pass,
            self._reply,
            self.settings.max_in_flight,
            self.settings.max_prompt_tokens,
        )

    # --- data plane -----------------------------------------------------------------------

    async def _serve_frames(self, bus: Bus) -> None:
        async with bus.subscribe(ACTIVATIONS, node=self.node) as frames:
            async for _, frame in frames:
                try:
                    await self._on_frame(frame)
                except EdgesplitError as error:
                    self.counters["frames_failed"] += 1
                    log.warning("%s: frame of %s dropped: %s", self.node, frame.header.request_id, error)
                except Exception:  # one bad frame must never stop the node
                    self.counters["frames_failed"] += 1
                    log.exception("%s: frame of %s failed", self.node, frame.header.request_id)

    async def _on_frame(self, frame: Frame) -> None:
        header, route = frame.header, self.route
        if is_probe(frame):
            return  # the prober has its own subscription
        if route is None or header.epoch != route.epoch:
            self.counters["frames_fenced"] += 1
            return
        target = header.extra.get("target")
        if not isinstance(target, int) or isinstance(target, bool):
            raise _Refused("frame has no integer 'target' block")
        if header.extra.get("release") is True:
            if self.host is not None and target == self.host.start:
                self.host.release(header.request_id)
                if self.host.end < route.num_layers:
                    await self._send(route, header, frame.array, self.host.end)
            return
        if target == route.num_layers:
            future = self._pending.pop((header.request_id, header.step), None)
            if future is None or future.done():
                self.counters["results_unexpected"] += 1
            else:
                future.set_result(frame.array)
            return
        if self.host is None or target != self.host.start:
            raise _Refused(f"frame for block {target}, but this node runs {self.route and self.route.segment_of(self.node)}")
        position = header.extra.get("pos", 0)
        self._check_activation(frame.array, position)
        hidden = await self.compute.run(self.host.forward, header.request_id, frame.array, position, self.slowdown)
        if self.host.end == route.num_layers and header.extra.get("last_only") is True:
            hidden = hidden[-1:]
        await self._send(route, header, hidden, self.host.end)

    def _check_activation(self, array: np.ndarray, position: object) -> None:
        """Refuse a frame whose tensor is not [T, hidden] float32 or whose position is bad."""
        assert self.store is not None
        hidden = self.store.config.hidden_size
        if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != hidden or not array.shape[0]:
            raise _Refused(f"activation must be float32 [T, {hidden}], got {array.dtype}{list(array.shape)}")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise _Refused(f"frame position {position!r} is not a non-negative integer")

    async def _send(self, route: Route, header: FrameHeader, array: np.ndarray, target: int) -> None:
        extra = {**header.extra, "target": target, "src": self.node, "sent_at": time.time()}
        out = FrameHeader(request_id=header.request_id, step=header.step, epoch=route.epoch,
                          seq=next(self._seq), extra=extra)  # fmt: skip
        destination = route.node_for(target)
        await self.shaper.send(destination, encode_frame(out, array))

    async def _publish_frame(self, destination: str, payload: bytes) -> None:
        assert self._bus is not None
        await self._bus.publish_raw_frame(ACTIVATIONS, payload, node=destination)

    async def _pipeline_pass(
        self, request_id: str, step: int, token_ids: np.ndarray, position: int, last_only: bool
    ) -> np.ndarray:
        """Entry side of one pass: embed, run local blocks, send on, await the final state."""
        route = self.route
        assert route is not None and self.entry is not None
        hidden = await self.compute.run(self.entry.embed_tokens, token_ids, position)
        target = 0
        while target < route.num_layers and route.node_for(target) == self.node:
            assert self.host is not None
            hidden = await self.compute.run(self.host.forward, request_id, hidden, position, self.slowdown)
            target = self.host.end
        if target == route.num_layers:
            return hidden[-1:] if last_only else hidden
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending[(request_id, step)] = future
        header = FrameHeader(request_id=request_id, step=step, epoch=route.epoch, seq=0,
                             extra={"pos": position, "last_only": last_only})  # fmt: skip
        await self._send(route, header, hidden, target)
        try:
            async with asyncio.timeout(self.settings.stage_timeout_s):
                return await future
        except TimeoutError:
            raise StageTimedOut(
                f"no result for request {request_id} step {step} within "
                f"{self.settings.stage_timeout_s} s (epoch {route.epoch})"
            ) from None
        finally:
            self._pending.pop((request_id, step), None)

    async def _release(self, request_id: str) -> None:
        """Tell the pipeline to free a finished request's KV caches (best effort)."""
        route = self.route
        if route is None:
            return
        if self.host is not None and route.node_for(0) == self.node:
            self.host.release(request_id)
            target = self.host.end
        else:
            target = 0
        if target < route.num_layers:
            header = FrameHeader(request_id=request_id, step=0, epoch=route.epoch, seq=0,
                                 extra={"release": True})  # fmt: skip
            empty = np.zeros((0, self.store.config.hidden_size if self.store else 0), np.float32)
            await self._send(route, header, empty, target)

    # --- requests -------------------------------------------------------------------------

    async def _serve_requests(self, bus: Bus) -> None:
        async with bus.subscribe(REQUESTS, node=self.node) as requests:
            async for _, request in requests:
                try:
                    await self._on_request(request)
                except Exception:  # one bad request must never stop the node
                    log.exception("%s: request %s not handled", self.node, request.request_id)

    async def _on_request(self, request: GenerateRequest | EmbedRequest) -> None:
        entry, route = self.entry, self.route
        if entry is None or route is None:
            await self._reply(request.reply_to, RequestFailed(
                request_id=request.request_id, error="invalid_request",
                message=f"node {self.node} is not the entry of the current plan"))  # fmt: skip
            return
        refusal = entry.admit(request)
        if refusal is not None:
            self.counters[f"refused_{refusal.error}"] += 1
            await self._reply(request.reply_to, refusal)
            return
        assert self._task_group is not None
        self._task_group.create_task(self._serve_one(entry, request))

    async def _serve_one(self, entry: EntryRole, request: GenerateRequest | EmbedRequest) -> None:
        try:
            await entry.serve(request)
        finally:
            try:
                await self._release(request.request_id)
            except EdgesplitError as error:
                log.info("release of %s not sent: %s", request.request_id, error)

    async def _reply(self, client: str, message: Message) -> None:
        assert self._bus is not None
        try:
            await self._bus.publish(REPLIES, message, client=client)
        except EdgesplitError as error:
            log.warning("%s: reply to %s lost: %s", self.node, client, error)

    async def _sweep_caches(self) -> None:
        interval_s = min(10.0, self.settings.kv_idle_timeout_s / 2)
        while True:
            await asyncio.sleep(interval_s)
            if self.host is not None:
                freed = self.host.sweep(self.settings.kv_idle_timeout_s)
                if freed:
                    log.info("%s: freed idle KV caches of %d requests", self.node, len(freed))


class _Refused(EdgesplitError):
    """A plan or frame this worker will not act on."""
