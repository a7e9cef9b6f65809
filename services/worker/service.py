"""The worker service: one emulated edge node hosting a segment of the model.

It announces itself (retained birth status + Last Will), follows the plan protocol
(PREPARE loads the next epoch's blocks in the background while the current epoch keeps
serving, COMMIT or the retained plan switches, ABORT drops what was prepared), runs the
activation frames addressed to it (services/worker/dataplane.py) and, when the plan
names it entry, serves requests (services/worker/entry.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from services.worker.admission import in_flight_for_speed, queue_bound_for
from services.worker.batching import is_decode_step
from services.worker.compute import ComputeThread, SegmentHost, Slowdown
from services.worker.compute_thread import COMPUTE_QUEUE
from services.worker.dataplane import DataPlane, FrameLimits
from services.worker.deadline import StageDeadline
from services.worker.emulation import Emulation, initial_command
from services.worker.entry import EntryRole
from services.worker.epochs import EpochKeeper, Serving
from services.worker.guard import PlanRefused, PrivacyGuard
from services.worker.health import Health
from services.worker.kv_budget import KvBudget, KvLedger, default_kv_budget, pipeline_blocks
from services.worker.probes import LinkProber
from services.worker.replies import Reply, ReplySender
from services.worker.settings import WorkerSettings
from services.worker.shaper import EgressShaper
from services.worker.shard_cache import CachedShards, warm_ahead
from services.worker.shard_source import open_store
from services.worker.telemetry import StartupBenchmark, TelemetryReporter, TelemetrySources
from shared.bus import Announcement, Bus
from shared.errors import EdgesplitError
from shared.frame_headers import BatchHeader
from shared.messages import (
    AbortEpoch,
    CommitEpoch,
    EmbedRequest,
    EpochReady,
    EpochRejected,
    GenerateRequest,
    NodeStatus,
    Plan,
    PrepareEpoch,
    RequestFailed,
    Segment,
)
from shared.metrics import Reading, ServiceMetrics, message_readings
from shared.model.runtime import EntryRuntime
from shared.model.shard import ShardStore
from shared.model.tokenizer import TextTokenizer
from shared.planning.route import Route, route_of
from shared.security.frame_keys import PeerKeys, derive_frame_key, parse_frame_key
from shared.security.role_keys import role_verifier
from shared.security.signing import ControlGate, receiver_fences, require_control_key
from shared.tensor_frame import Frame
from shared.topics import (
    ACTIVATIONS,
    EPOCH_ACKS,
    EPOCH_COMMANDS,
    NODE_STATUS,
    PLAN,
    REQUESTS,
)

log = logging.getLogger(__name__)

WAITING_SWEEP_S = 0.25
"""How often the entry looks for waiting requests past their deadline (and free slots)."""


class WorkerService:
    """A worker process's service. Constructor does no I/O; ``run()`` serves until cancelled."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.compute = ComputeThread(settings.threads)
        self.slowdown = Slowdown(settings.slowdown)
        self.shaper = EgressShaper(self._publish_frame)
        self.kv_budget = KvBudget(settings.kv_budget_bytes, self.kv_in_use)
        """The node's KV budget; set for each committed epoch unless configured."""
        self.emulation = Emulation(self.node, self.slowdown, self.shaper.schedule)
        self.emulation.apply(initial_command(settings))  # the same path as run-time commands
        self.prober = LinkProber(self.node, settings, self.shaper.send, queue_wait=self.shaper.queue_wait_s)
        self.keeper = EpochKeeper(drain_s=settings.stage_timeout_s)
        self.peer_keys = PeerKeys(self.node)
        """This process's frame key (new per process) and the keys its peers announced."""
        keeper = self.keeper
        self.telemetry = TelemetryReporter(TelemetrySources(
            self.node, settings.telemetry_period_s, self.compute,
            serving=lambda: keeper.current,
            links=lambda: self.prober.window(self.shaper.delivery_rates()),
            frames_forged=lambda: self.data.counters["frames_forged"] if self.data else 0,
            decode_batches=lambda: (self.data.counters["decode_batches"],
                                    self.data.counters["decode_batched_rows"]) if self.data else (0, 0),
            batched_frames=lambda: (self.data.counters["batched_frames_sent"],
                                    self.data.counters["batched_frames_rows"]) if self.data else (0, 0),
            overflows=self.overflows, news=self.prober.news))  # fmt: skip
        self.store: ShardStore | None = None
        self.shards: CachedShards | None = None
        self.data: DataPlane | None = None
        self.counters: Counter[str] = Counter()
        self.gate = receiver_fences(ControlGate(require_control_key(settings, f"worker {self.node}"), self.node,
                                                   self.counters, role_verifier(settings),
                                                   settings.max_message_age_s), settings)  # fmt: skip
        """Signatures and epoch fencing of every control message this node acts on."""
        self.emulation.gate = self.gate
        self.ready = asyncio.Event()
        """Set once the first plan is loaded and served."""
        self._bus: Bus | None = None
        self._preparing: set[int] = set()
        self._answers: dict[int, EpochReady | EpochRejected] = {}
        self._switch_lock = asyncio.Lock()
        self.replies = ReplySender(self.node)
        self.guard = PrivacyGuard(settings)
        self.guard.gate = self.gate
        self.health: Health | None = None
        self._task_group: asyncio.TaskGroup | None = None
        self._announced_refusals: dict[str, int] = {}
        self.metrics = ServiceMetrics(f"worker {self.node}", ("replan_stall", "latency"))
        self.metrics.add_reader(self._readings)

    # The committed epoch's state, as telemetry and status read it.
    @property
    def route(self) -> Route | None:
        return self.keeper.current.route if self.keeper.current else None

    @property
    def host(self) -> SegmentHost | None:
        return self.keeper.current.host if self.keeper.current else None

    @property
    def entry(self) -> EntryRole | None:
        return self.keeper.current.entry if self.keeper.current else None

    # --- lifecycle ------------------------------------------------------------------------

    def status(self, state: str = "online") -> NodeStatus:
        route = self.route
        segment = route.segment_of(self.node) if route else None
        return NodeStatus(
            node=self.node,  # type: ignore[arg-type]
            state=state,  # type: ignore[arg-type]
            trust=self.settings.trust,
            memory_bytes=self.settings.memory_bytes,
            threads=self.settings.threads,
            device=self.settings.device,
            capabilities=("gpt2", "llama", "bert"),
            epoch=route.epoch if route else None,
            segments=(Segment(node=self.node, start=segment[0], end=segment[1]),) if segment else (),  # type: ignore[arg-type]
            entry=bool(route and route.entry == self.node),
            kv_budget_bytes=self.kv_budget.limit_bytes,
            refused=self.refusals(),
            frame_public_key=self.peer_keys.public_hex,
        )

    def refusals(self) -> dict[str, int]:
        """Control messages refused (``{Kind}_{why}``) and sessions taken over
        (``Session_takenover``): what its status shows."""
        return {**self.gate.refusals(), **(self._bus.refusals() if self._bus is not None else {})}

    def overflows(self) -> int:
        """Items refused or dropped by this node's bounded queues: its bus subscriptions,
        the reply sender, the compute thread and the egress shaper."""
        bus = self._bus.counters if self._bus is not None else {}
        dropped = sum(n for key, n in bus.items() if key.startswith("overflow:"))
        return dropped + self.replies.dropped + self.compute.refused + self.shaper.dropped

    def kv_in_use(self) -> int:
        """KV bytes allocated by every segment host this node keeps (draining epochs too)."""
        return sum(host.kv_allocated_bytes() for host in self.keeper.hosts())

    def _set_kv_budget(self, serving: Serving) -> None:
        """The configured budget, or the default for the blocks ``serving`` gives this node."""
        if self.settings.kv_budget_bytes is not None or self.store is None:
            return
        blocks = serving.host.end - serving.host.start if serving.host is not None else 0
        self.kv_budget.limit_bytes = default_kv_budget(self.settings.memory_bytes, self.store.config, blocks)

    async def run(self) -> None:
        self.store = await asyncio.to_thread(open_store, self.settings)
        self.shards = CachedShards(self.store, self.settings.shard_cache_bytes)
        deadline = StageDeadline(self.settings.stage_timeout_s, self.settings.stage_min_s, self.settings.stage_factor)
        self.data = DataPlane(self.node, FrameLimits.of(self.store.config), self.keeper, self.compute,
                              self.slowdown, self.shaper.send, self.settings.stage_timeout_s, deadline,
                              self.peer_keys)  # fmt: skip
        self.data.withheld = self.guard.refusal
        self.data.activation_precision = self.settings.activation_precision
        self.data.batches.enabled = self.settings.batch_frames
        health = self.health = Health(self.node, self.data, self.keeper, self.settings.stall_s, self.counters)
        health.gate = self.gate
        birth = Announcement(NODE_STATUS, self.status("online"), {"node": self.node})
        will = Announcement(NODE_STATUS, self.status("offline"), {"node": self.node})
        try:
            async with (self.metrics.served(self.settings),
                        Bus(self.settings, origin=self.node, birth=birth, will=will) as bus):  # fmt: skip
                self._bus = bus
                async with asyncio.TaskGroup() as task_group:
                    self._task_group = task_group
                    task_group.create_task(self.shaper.run(), name="shaper")
                    task_group.create_task(self._follow_plans(bus), name="plans")
                    task_group.create_task(self._follow_epochs(bus), name="epochs")
                    task_group.create_task(self._serve_frames(bus), name="frames")
                    task_group.create_task(self._serve_requests(bus), name="requests")
                    task_group.create_task(self._sweep_waiting(), name="waiting")
                    task_group.create_task(self.replies.run(bus), name="replies")
                    task_group.create_task(health.follow(bus), name="health")
                    task_group.create_task(self.guard.follow(bus), name="policy")
                    task_group.create_task(self._housekeeping(), name="housekeeping")
                    task_group.create_task(health.watch_stalls(), name="stalls")
                    task_group.create_task(health.watch_reconnects(bus), name="reconnects")
                    task_group.create_task(self.telemetry.run(bus, self._benchmark()), name="telemetry")
                    task_group.create_task(self.prober.run(bus), name="probes")
                    task_group.create_task(self.emulation.run(bus), name="emulation")
                    task_group.create_task(warm_ahead(self.shards, self.settings), name="warm-shards")
        finally:
            self.compute.close()
            counters = self.counters + (self.data.counters if self.data else Counter())
            counters += self.entry.counters if self.entry else Counter()
            counters["frames_unsent"] += self.shaper.unsent
            log.info("%s: stopping; counters %s", self.node, dict(sorted(counters.items())))

    def _benchmark(self) -> StartupBenchmark | None:
        """The start-up benchmark telemetry calibrates with (None when switched off)."""
        if not self.settings.benchmark or self.store is None:
            return None
        return StartupBenchmark(self.store, self.slowdown.factor, self.settings.device)

    async def _announce(self) -> None:
        assert self._bus is not None
        status = self.status("online")
        self._announced_refusals = status.refused
        self._bus.set_birth(Announcement(NODE_STATUS, status, {"node": self.node}))
        try:
            await self._bus.publish(NODE_STATUS, status, node=self.node)
        except EdgesplitError as error:  # the bus republishes the birth when it reconnects
            log.warning("%s: status not published: %s", self.node, error)

    # --- plans and epochs -----------------------------------------------------------------

    async def _follow_plans(self, bus: Bus) -> None:
        """The retained plan is the committed record: switch to it (loading if this node
        missed its PREPARE, e.g. after a restart)."""
        async with bus.subscribe(PLAN) as plans:
            async for _, plan in plans:
                if not self.gate.accept(plan, plan.epoch):
                    continue
                try:
                    await self._commit_plan(plan)
                except Exception as error:  # noqa: BLE001 - a bad plan never stops the node
                    await self._refused(plan.epoch, error)

    async def _follow_epochs(self, bus: Bus) -> None:
        async with bus.subscribe(EPOCH_COMMANDS) as commands:
            async for _, command in commands:
                if not self.gate.accept(command, command.epoch):
                    continue
                try:
                    if isinstance(command, PrepareEpoch):
                        self._start_prepare(command)
                    elif isinstance(command, CommitEpoch):
                        await self._commit(command.epoch)
                    elif isinstance(command, AbortEpoch):
                        if self.keeper.abort(command.epoch) is not None:
                            log.info("%s: epoch %d aborted: %s", self.node, command.epoch, command.reason)
                        self._answers.pop(command.epoch, None)
                except Exception:  # one bad command must never stop the node
                    log.exception("%s: epoch command %s failed", self.node, type(command).__name__)

    def _start_prepare(self, command: PrepareEpoch) -> None:
        epoch = command.epoch
        if epoch in self._answers:  # a duplicate PREPARE: answer again, idempotently
            assert self._task_group is not None
            self._task_group.create_task(self._ack(self._answers[epoch]))
            return
        if epoch in self._preparing or self.keeper.is_stale(epoch):
            return
        self._preparing.add(epoch)
        assert self._task_group is not None
        self._task_group.create_task(self._prepare(command), name=f"prepare-{epoch}")

    async def _prepare(self, command: PrepareEpoch) -> None:
        """Make-before-break: build epoch N+1's state off the compute thread, then READY."""
        epoch = command.epoch
        try:
            if command.plan.epoch != epoch:
                raise PlanRefused(f"PREPARE {epoch} carries a plan of epoch {command.plan.epoch}")
            key = parse_frame_key(command.frame_key) if command.frame_key else None
            serving = await self._build(command.plan, key)
            self.keeper.prepare(serving)
            answer: EpochReady | EpochRejected = EpochReady(epoch=epoch, node=self.node)  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - every failure becomes a NACK with its reason
            if not isinstance(error, EdgesplitError):
                log.exception("%s: PREPARE %d failed", self.node, epoch)
            answer = EpochRejected(epoch=epoch, node=self.node, reason=str(error)[:1024])  # type: ignore[arg-type]
        finally:
            self._preparing.discard(epoch)
        self._answers[epoch] = answer
        await self._ack(answer)

    async def _commit(self, epoch: int) -> bool:
        """Switch to prepared ``epoch``; False when it was not prepared here."""
        async with self._switch_lock:
            previous = self.entry
            serving = self.keeper.commit(epoch, time.monotonic())
            if serving is None:
                return False
            if previous is not None and previous is not serving.entry:  # its waiting clients resubmit
                previous.drop_waiting(f"node {self.node} is not the entry of the current plan "
                                      f"(epoch {epoch}); resubmit to its entry")  # fmt: skip
            self.gate.committed(epoch)
            if serving.host is not None:
                serving.host.on_forward = self.telemetry.timer.record
            self._set_kv_budget(serving)
            self._answers = {e: a for e, a in self._answers.items() if e > epoch}
            if self.health is not None:
                self.health.epoch_committed()
            await self._announce()
            self.ready.set()
            segment = serving.route.segment_of(self.node)
            log.info("%s serving epoch %d: segment %s%s", self.node, epoch, segment,
                     " (entry)" if serving.entry else "")  # fmt: skip
            return True

    async def _commit_plan(self, plan: Plan) -> None:
        if self.keeper.is_stale(plan.epoch):
            if plan.epoch < (self.keeper.epoch or 0):
                self.counters["stale_plans"] += 1
            return  # a duplicate or an older epoch: already done, or fenced
        if plan.epoch not in self.keeper.prepared:
            self.keeper.prepare(await self._build(plan))
        if await self._commit(plan.epoch):
            await self._ack(EpochReady(epoch=plan.epoch, node=self.node))  # type: ignore[arg-type]

    async def _build(self, plan: Plan, frame_key: bytes | None = None) -> Serving:
        """Verify ``plan`` and load what this node needs for it (reusing what it holds).
        ``frame_key``: the epoch's frame key from its PREPARE; derived from the plan when
        None (a retained plan)."""
        assert self.store is not None and self.shards is not None
        if not self.gate.signed(plan):
            raise PlanRefused(f"plan epoch {plan.epoch} has a bad or missing signature")
        if self.keeper.is_stale(plan.epoch):
            raise PlanRefused(f"plan epoch {plan.epoch} is not newer than epoch {self.keeper.epoch}")
        route = route_of(plan, self.store.config.num_layers)
        segment = route.segment_of(self.node)
        if segment is not None or route.entry == self.node:  # a spare node needs no shards
            self.store.check_manifest_pin(plan.manifest_sha256)  # ManifestMismatch: NACK naming both
        try:
            self.guard.check(route, segment)
        except PlanRefused as error:
            self.gate.refuse(plan, "private", str(error))
            raise
        host = next((h for h in self.keeper.hosts() if (h.start, h.end) == segment), None)
        if segment is not None and host is None:
            host = await asyncio.to_thread(SegmentHost, self.shards, segment[0], segment[1],
                                           self.settings.device, self.kv_budget)  # fmt: skip
        entry = self.entry if route.entry == self.node else None
        if route.entry == self.node and entry is None:
            entry = await asyncio.to_thread(self._make_entry)
        if frame_key is None:
            frame_key = derive_frame_key(self.gate.key, plan.epoch, plan.signature)
        return Serving(route, host if segment is not None else None, entry, frame_key)

    def _make_entry(self) -> EntryRole:
        assert self.store is not None and self.data is not None
        return EntryRole(
            EntryRuntime(self.store, device=self.settings.device),
            TextTokenizer.from_file(self.store.tokenizer_path),
            self.compute.run,
            self.data.pipeline_pass,
            self.replies.queue,
            self._max_in_flight(),
            self.settings.max_prompt_tokens,
            current_epoch=lambda: self.keeper.epoch,
            handoff=self._timed_handoff if self.settings.kv_handoff else None,
            wait_for_epoch=self.health.wait_for_epoch_after if self.health else None,
            failover_wait_s=self.settings.failover_wait_s,
            max_replays=self.settings.max_replays,
            max_prompt_chars=self.settings.max_prompt_chars,
            kv_ledger=KvLedger(self.store.config, lambda: pipeline_blocks(self.route), self._kv_budgets),
            latency=self.metrics,  # the entry's TTFT and TPOT, with or without a gateway
        )

    def _max_in_flight(self) -> int:
        """The configured bound, else the one this node's measured decode speed gives."""
        if self.settings.max_in_flight is not None:
            return self.settings.max_in_flight
        blocks = self.store.config.num_layers if self.store is not None else 0
        return in_flight_for_speed(self.telemetry.timer.decode_s_per_block(), blocks,
                                   self.settings.in_flight_tpot_s)  # fmt: skip

    def _max_queued(self, entry: EntryRole) -> int:
        """The configured queue bound, else the one the pipeline's KV budgets give."""
        if self.settings.max_queued_requests is not None:
            return self.settings.max_queued_requests
        ledger = entry.kv_ledger
        if ledger is None:
            return queue_bound_for({}, {}, 0)
        return queue_bound_for(self._kv_budgets(), pipeline_blocks(self.route), ledger.per_token_block)

    async def _timed_handoff(self, request_id: str, old_epoch: int, length: int) -> bool:
        """The KV handoff at a token boundary, its wait observed as a re-plan's stall."""
        assert self.data is not None
        started_s = time.monotonic()
        moved = await self.data.handoff.move(request_id, old_epoch, length)
        self.metrics.replan_stall_s.labels("kv_handoff" if moved else "kv_handoff_failed").observe(
            time.monotonic() - started_s)
        return moved

    def _readings(self) -> list[Reading]:
        """This node's message counters, utilisation, KV bytes, weights and KV moved."""
        counters = self.counters + (self.data.counters if self.data else Counter())
        counters += self.entry.counters if self.entry else Counter()
        bus = self._bus.counters if self._bus is not None else {}
        node = (self.node,)
        refusals = self.refusals()  # counted in self.counters too: once here
        readings = message_readings(bus, refusals, {k: n for k, n in counters.items() if k not in refusals})
        latest = self.telemetry.latest
        if latest is not None:
            readings += [Reading("edgesplit_node_utilisation", latest.cpu_utilisation, node),
                         Reading("edgesplit_node_compute_busy", latest.compute_busy, node)]  # fmt: skip
        loaded = self.shards.loaded_bytes if self.shards is not None else 0
        return [*readings, Reading("edgesplit_node_kv_cache_bytes", float(self.kv_in_use()), node),
                Reading("edgesplit_weights_moved_bytes", float(loaded), node),
                Reading("edgesplit_kv_moved_bytes", float(counters["kv_bytes_received"]), node),
                Reading("edgesplit_plan_epoch", float(self.keeper.epoch or 0))]  # fmt: skip

    def _kv_budgets(self) -> dict[str, int | None]:
        """Every node's KV budget as known here: this node's own, the others' announced."""
        known = dict(self.health.kv_budgets) if self.health is not None else {}
        return {**known, self.node: self.kv_budget.limit_bytes}

    async def _ack(self, answer: EpochReady | EpochRejected) -> None:
        assert self._bus is not None
        try:
            await self._bus.publish(EPOCH_ACKS, answer, node=self.node)
        except EdgesplitError as error:
            log.warning("%s: ack of epoch %d lost: %s", self.node, answer.epoch, error)

    async def _refused(self, epoch: int, error: Exception) -> None:
        if not isinstance(error, EdgesplitError):
            log.exception("%s: plan epoch %d failed", self.node, epoch)
        self.counters["plans_refused"] += 1
        log.warning("%s: refused plan epoch %d: %s", self.node, epoch, error)
        await self._ack(EpochRejected(epoch=epoch, node=self.node, reason=str(error)[:1024]))  # type: ignore[arg-type]

    # --- data plane and requests ----------------------------------------------------------

    async def _serve_frames(self, bus: Bus) -> None:
        """Frames in arrival order, one at a time, except decode steps: each runs in a task
        of its own (at most COMPUTE_QUEUE at once), so the steps of other requests that
        arrive meanwhile join its batch on the compute thread (batching.py). One request
        has one step in flight at a time, so its own frames still come in order. A batch
        frame's rows (batch_frames.py) are started in one turn: they run as one batch."""
        assert self.data is not None
        room = asyncio.Semaphore(COMPUTE_QUEUE)
        async with asyncio.TaskGroup() as steps, bus.subscribe(ACTIVATIONS, node=self.node) as frames:
            async for _, frame in frames:
                rows, trusted = await self._open(frame)
                for row in rows:
                    if not is_decode_step(row.header, row.array.shape[0]):
                        await self._on_frame(row, trusted=trusted)
                        continue
                    await room.acquire()
                    steps.create_task(self._on_frame(row, room, trusted), name="decode-step")

    async def _open(self, frame: Frame) -> tuple[list[Frame], bool]:
        """A batch frame's rows, authenticated (True), or ``frame`` itself (False); never
        raises (a bad batch frame is dropped and counted, `DataPlane.open_batch`)."""
        assert self.data is not None
        if not isinstance(frame.header, BatchHeader):
            return [frame], False
        try:
            return await self.data.open_batch(frame), True
        except EdgesplitError as error:
            self.counters["frames_failed"] += 1
            log.warning("%s: batch frame of %s dropped: %s", self.node, frame.header.request_id, error)
        except Exception:  # one bad frame must never stop the node
            self.counters["frames_failed"] += 1
            log.exception("%s: batch frame of %s failed", self.node, frame.header.request_id)
        return [], False

    async def _on_frame(self, frame: Frame, room: asyncio.Semaphore | None = None, trusted: bool = False) -> None:
        """Handle one frame; never raises (a bad frame must never stop the node)."""
        assert self.data is not None
        try:
            await self.data.on_frame(frame, trusted)
        except EdgesplitError as error:
            self.counters["frames_failed"] += 1
            log.warning("%s: frame of %s dropped: %s", self.node, frame.header.request_id, error)
        except Exception:  # one bad frame must never stop the node
            self.counters["frames_failed"] += 1
            log.exception("%s: frame of %s failed", self.node, frame.header.request_id)
        finally:
            if room is not None:
                room.release()

    async def _publish_frame(self, destination: str, payload: bytes) -> None:
        assert self._bus is not None
        await self._bus.publish_raw_frame(ACTIVATIONS, payload, node=destination)
        if self.settings.duplicate_frames:  # fault injection: every frame arrives twice
            await self._bus.publish_raw_frame(ACTIVATIONS, payload, node=destination)

    async def _serve_requests(self, bus: Bus) -> None:
        async with bus.subscribe(REQUESTS, node=self.node) as requests:
            async for _, request in requests:
                try:
                    await self._on_request(request)
                except Exception:  # one bad request must never stop the node
                    log.exception("%s: request %s not handled", self.node, request.request_id)

    async def _on_request(self, request: GenerateRequest | EmbedRequest) -> None:
        self.replies.remember(request.request_id, request.reply_key)  # every reply is sealed with it
        entry = self.entry
        if entry is None:
            await self._reply(request.reply_to, RequestFailed(
                request_id=request.request_id, error="invalid_request",
                message=f"node {self.node} is not the entry of the current plan"))  # fmt: skip
            return
        if await entry.repeat(request):
            return  # a redelivery or a resubmission of a request this entry has seen
        self.replies.remember(request.request_id, request.reply_key, new=True)
        entry.max_in_flight, entry.max_queued = self._max_in_flight(), self._max_queued(entry)
        admitted = entry.admit(request)
        if isinstance(admitted, RequestFailed):
            self.counters[f"refused_{admitted.error}"] += 1
            await self._reply(request.reply_to, admitted)
        elif admitted == "start":
            self._start(entry, request)

    def _start(self, entry: EntryRole, request: GenerateRequest | EmbedRequest) -> None:
        assert self._task_group is not None
        self._task_group.create_task(self._serve_one(entry, request), name=f"request-{request.request_id}")

    def _start_waiting(self, entry: EntryRole) -> None:
        """Start the waiting requests that free slots take (oldest first); those past their
        deadline are answered busy."""
        for request in entry.take_waiting():
            self._start(entry, request)

    async def _sweep_waiting(self) -> None:
        """Waiting requests whose deadline passed are answered even when no slot frees."""
        while True:
            await asyncio.sleep(WAITING_SWEEP_S)
            entry = self.entry
            if entry is not None and len(entry.waiting):
                self._start_waiting(entry)

    async def _serve_one(self, entry: EntryRole, request: GenerateRequest | EmbedRequest) -> None:
        assert self.data is not None
        try:
            await entry.serve(request)  # every failure but cancellation is answered inside
            self._start_waiting(entry)  # its slot is free: the oldest waiting request takes it
        finally:
            try:
                await self.data.release(request.request_id)
            except EdgesplitError as error:
                log.info("release of %s not sent: %s", request.request_id, error)

    async def _reply(self, client: str, message: Reply) -> None:
        self.replies.queue(client, message)

    async def _housekeeping(self) -> None:
        """Free idle KV caches, partial K/V imports and the hosts of drained epochs."""
        idle_s, partial_s = self.settings.kv_idle_timeout_s, self.settings.kv_partial_timeout_s
        interval_s = min(5.0, idle_s / 2, partial_s / 2)
        while True:
            await asyncio.sleep(interval_s)
            for serving in self.keeper.expire(time.monotonic()):
                log.info("%s: epoch %d drained", self.node, serving.epoch)
            for host in self.keeper.hosts():
                freed = host.sweep(idle_s, partial_s)
                if freed:
                    log.info("%s: freed idle KV caches of %d requests", self.node, len(freed))
            if self._bus is not None and self.refusals() != self._announced_refusals:
                await self._announce()  # refusals show in `edgesplit status`
