"""The broadcaster service: rolls plans out as new epochs in two phases.

It owns epoch numbering. At start it reads the retained plan (the committed epoch) and
the retained `EpochLedger` (the highest epoch ever used, and a rollout a previous
instance left in progress, which it settles: `logic.recover`). Then one loop feeds
RolloutRequested, EpochReady / EpochRejected, plans and READY deadlines to the pure
`logic.apply` and publishes what it returns, in order. A stop (SIGTERM, cancel) during
a rollout aborts it before leaving. See docs/ARCHITECTURE.md, "Reconfiguration broadcast".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from services.broadcaster.checks import ledger_problem, private_problem
from services.broadcaster.logic import (
    Acked,
    Actions,
    BroadcastConfig,
    BroadcastState,
    Deadline,
    Event,
    LedgerSeen,
    NodeBack,
    NodeLost,
    PlanSeen,
    Requested,
    apply,
    recover,
    shutdown,
)
from shared.bus import Bus, Subscription
from shared.config import BusSettings
from shared.errors import ConfigError, EdgesplitError
from shared.messages import (
    EpochLedger,
    NodeDown,
    NodeJoined,
    NodeStatus,
    Plan,
    PrivacyPolicy,
    PrivacyPolicySet,
    RolloutFinished,
    RolloutRequested,
)
from shared.metrics import Reading, ServiceMetrics, message_readings
from shared.security.reporting import report_refusals
from shared.security.role_keys import role_signer, role_verifier
from shared.security.signing import ControlGate, control_key, receiver_fences
from shared.security.trust import TrustRegistry, load_trust
from shared.topics import (
    EPOCH_ACKS,
    NODE_STATUS,
    PLAN,
    POLICY,
    PROFILE_EVENTS,
    ROLLOUT_LEDGER,
    ROLLOUTS,
)

log = logging.getLogger(__name__)


class BroadcasterSettings(BusSettings):
    """The broadcaster process. Units in field names."""

    shards_dir: Path | None = Field(
        default=None, description="shard store: the model's block count"
    )
    max_queued_rollouts: int = Field(default=16, ge=0, le=1024)
    retained_wait_s: float = Field(
        default=0.5, ge=0, description="wait for retained plan and ledger"
    )
    idle_tick_s: float = Field(default=5.0, gt=0, description="longest wait without a deadline")
    publish_attempts: int = Field(default=3, ge=1, le=10)


def load_num_layers(shards_dir: Path) -> int:
    """The block count from a shard store's manifest.json (no torch needed).

    Raises ConfigError when the manifest is missing or has no valid ``num_blocks``.
    """
    path = Path(shards_dir) / "manifest.json"
    try:
        blocks = json.loads(path.read_text())["num_blocks"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"cannot read the block count from {path}: {error}") from None
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        raise ConfigError(f"{path}: num_blocks must be a positive integer, got {blocks!r}")
    return blocks


def load_manifest_sha256(shards_dir: Path) -> str:
    """The sha256 of a shard store's manifest.json, which the plans it rolls out pin.
    Raises ConfigError when it cannot be read."""
    path = Path(shards_dir) / "manifest.json"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None


class BroadcasterService:
    """Constructor does no I/O; ``run()`` serves until cancelled. ``clock``: monotonic seconds."""

    def __init__(self, settings: BroadcasterSettings, num_layers: int | None = None,
                 clock: Callable[[], float] = time.monotonic, manifest_sha256: str = "") -> None:  # fmt: skip
        self.settings = settings
        self.clock = clock
        key = control_key(settings) or ""  # __main__ refuses to start without one on mqtts://
        signer = role_signer(settings)  # the broadcaster's own key signs its plans
        self.config = BroadcastConfig(signing_key=key, num_layers=num_layers, manifest_sha256=manifest_sha256,
                                      max_queued=settings.max_queued_rollouts,
                                      plan_signer=signer.sign if signer is not None else None)  # fmt: skip
        self.state = BroadcastState(self.config)
        self.counters: Counter[str] = Counter()
        self.gate = receiver_fences(ControlGate(key, "broadcaster", self.counters, role_verifier(settings),
                                                   settings.max_message_age_s), settings)  # fmt: skip
        """Signatures of what it acts on: only signed rollouts are signed (no signing oracle)."""
        self.trust: TrustRegistry | None = None
        self.policy: PrivacyPolicy | None = None
        """The signed privacy policy in force: a rollout breaking it is refused."""
        self.ready = asyncio.Event()
        """Set once the retained state is read and any interrupted rollout is settled."""
        self._events: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
        self.metrics = ServiceMetrics("broadcaster", ("replan_stall", "rollouts"))
        self._bus: Bus | None = None

    async def run(self) -> None:
        origin = self.settings.client_id or "broadcaster"
        self.trust = await asyncio.to_thread(load_trust, self.settings.identities_file)
        self.metrics.add_reader(self._readings)
        async with (
            self.metrics.served(self.settings),
            Bus(self.settings, origin=origin) as bus,
            bus.subscribe(POLICY) as policies,
            bus.subscribe(PLAN) as plans,
            bus.subscribe(ROLLOUT_LEDGER) as ledgers,
            bus.subscribe(EPOCH_ACKS) as acks,
            bus.subscribe(ROLLOUTS) as rollouts,
            bus.subscribe(NODE_STATUS) as statuses,
            bus.subscribe(PROFILE_EVENTS) as events,
        ):
            self._bus = bus
            plan, ledger = await self._read_retained(plans, ledgers)
            self.state, actions = recover(self.config, plan, ledger)
            log.info("broadcaster: committed epoch %d, highest epoch used %d",
                     self.state.committed_epoch, self.state.highest_epoch)  # fmt: skip
            await self._execute(bus, actions)
            self.ready.set()
            try:
                async with asyncio.TaskGroup() as task_group:
                    task_group.create_task(self._pump(plans, self._plan_event), name="plans")
                    task_group.create_task(self._pump(ledgers, self._ledger_event), name="ledger")
                    task_group.create_task(self._pump(acks, self._ack_event), name="acks")
                    task_group.create_task(
                        self._pump(rollouts, self._request_event), name="rollouts"
                    )
                    task_group.create_task(self._pump(statuses, self._status_event), name="statuses")
                    task_group.create_task(self._pump(events, self._profile_event), name="events")
                    task_group.create_task(self._decide(bus), name="decide")
                    task_group.create_task(self._follow_policy(policies), name="policy")
                    task_group.create_task(report_refusals(bus, origin, self.gate.refusals), name="refusals")
            finally:
                await asyncio.shield(self._abort_on_exit(bus))

    async def _read_retained(
        self, plans: Subscription[Plan], ledgers: Subscription[EpochLedger]
    ) -> tuple[Plan | None, EpochLedger | None]:
        """The retained plan (signature checked) and ledger, if the broker holds them.

        The broker sends retained messages right after confirming a subscription; what
        has not come within ``retained_wait_s`` counts as absent (a late one still
        arrives, as a PlanSeen / LedgerSeen event).
        """
        deadline_s = self.clock() + self.settings.retained_wait_s
        plan: Plan | None = None
        while plan is None and (left_s := deadline_s - self.clock()) > 0:
            candidate = await _next_within(plans, left_s)
            if candidate is None:
                break
            plan = candidate if self._signed(candidate) else None
        ledger = await _next_within(ledgers, max(0.0, deadline_s - self.clock()))
        committed = plan.epoch if plan is not None else 0
        return plan, ledger if ledger is not None and self._ledger_ok(ledger, committed) else None

    async def _pump(
        self, subscription: Subscription[Any], to_event: Callable[[Any], Event | None]
    ) -> None:
        async for _, message in subscription:
            event = to_event(message)
            if event is not None:
                await self._events.put(event)

    def _plan_event(self, plan: Plan) -> Event | None:
        return PlanSeen(plan, self.clock()) if self._signed(plan) else None

    def _ack_event(self, ack: Any) -> Event:
        return Acked(ack, self.clock())

    def _status_event(self, status: NodeStatus) -> Event:
        """A node's Last Will (or clean stop) aborts a rollout waiting for it; its birth
        clears it."""
        return NodeLost(status.node, "offline", self.clock()) if status.state == "offline" else NodeBack(status.node)

    def _profile_event(self, event: Any) -> Event | None:
        """The monitor's signed NodeDown (a frozen node has no Last Will yet) or NodeJoined."""
        if isinstance(event, NodeDown | NodeJoined) and self.gate.signed(event) and self.gate.current(event):
            return NodeLost(event.node, event.reason, self.clock()) if isinstance(event, NodeDown) else NodeBack(event.node)
        return None

    def _ledger_event(self, ledger: EpochLedger) -> Event | None:
        return LedgerSeen(ledger) if self._ledger_ok(ledger, self.state.committed_epoch) else None

    def _ledger_ok(self, ledger: EpochLedger, committed_epoch: int) -> bool:
        """Signed, and not a 'ledger bomb' (checks.ledger_problem)."""
        if not self.gate.signed(ledger):
            return False
        problem = ledger_problem(ledger, committed_epoch)
        if problem is not None:
            self.gate.refuse(ledger, "implausible", problem)
        return problem is None

    def _request_event(self, request: RolloutRequested) -> Event | None:
        """A signed request (the orchestrator's); one breaking the policy is answered
        with an abort, without a signature or an epoch spent on it."""
        if not self.gate.signed(request):
            return None
        refusal = private_problem(request.plan, self.config.num_layers, self.policy, self.trust)
        if refusal is not None:
            self.gate.refuse(request, "private", refusal)
        return Requested(request, self.clock(), refusal)

    def _signed(self, plan: Plan) -> bool:
        return self.gate.signed(plan)

    async def _follow_policy(self, policies: Subscription[PrivacyPolicySet]) -> None:
        async for _, message in policies:
            if self.gate.signed(message):
                self.policy = message.policy

    async def _decide(self, bus: Bus) -> None:
        """The one consumer: events (or the READY deadline) through `apply`, then publish."""
        while True:
            deadline_s = self.state.next_deadline_s
            wait_s = self.settings.idle_tick_s
            if deadline_s is not None:
                wait_s = min(wait_s, max(0.0, deadline_s - self.clock()))
            try:
                async with asyncio.timeout(wait_s):
                    event: Event = await self._events.get()
            except TimeoutError:
                event = Deadline(self.clock())
            await self._step(bus, event)

    async def _step(self, bus: Bus, event: Event) -> None:
        try:
            self.state, actions = apply(self.state, event)
        except Exception:  # noqa: BLE001 - one bad event never stops the service
            self.counters["events_failed"] += 1
            log.exception("broadcaster: event %s not handled", type(event).__name__)
            return
        await self._execute(bus, actions)

    async def _execute(self, bus: Bus, actions: Actions) -> None:
        """Publish each action in order; a publish is retried ``publish_attempts`` times."""
        for action in actions:
            self.counters[f"sent_{action.message.kind}"] += 1
            if isinstance(action.message, RolloutFinished):
                self._observe(action.message)
            log.info("broadcaster: %s %s", action.message.kind, _brief(action.message))
            for attempt in range(1, self.settings.publish_attempts + 1):
                try:
                    await bus.publish(action.topic, action.message, **action.params)
                    break
                except EdgesplitError as error:  # BusError, or WireError for an oversized plan
                    self.counters["publish_failed"] += 1
                    log.error("broadcaster: %s not published (attempt %d): %s",
                              action.message.kind, attempt, error)  # fmt: skip

    def _observe(self, finished: RolloutFinished) -> None:
        """A finished rollout into the metrics: its outcome, and how long PREPARE to the
        outcome took (the re-plan's stall before the switch)."""
        self.metrics.rollouts.labels(finished.outcome).inc()
        if finished.outcome == "committed":
            self.metrics.replan_stall_s.labels("prepare").observe(finished.prepare_s)

    def _readings(self) -> list[Reading]:
        bus = self._bus.counters if self._bus is not None else {}
        return [*message_readings(bus, self.gate.refusals()),
                Reading("edgesplit_plan_epoch", float(self.state.committed_epoch))]

    async def _abort_on_exit(self, bus: Bus) -> None:
        """Leaving with a rollout in flight: abort it so no worker stays half-prepared."""
        if self.state.active is None and not self.state.queue:
            return
        self.state, actions = shutdown(self.state, self.clock())
        try:
            async with asyncio.timeout(self.settings.publish_timeout_s):
                await self._execute(bus, actions)
        except (TimeoutError, EdgesplitError) as error:
            log.warning("broadcaster: abort on exit not sent (%s); the next start sends it", error)


async def _next_within(subscription: Subscription[Any], timeout_s: float) -> Any | None:
    """The next message of ``subscription`` within ``timeout_s`` seconds, or None."""
    try:
        async with asyncio.timeout(timeout_s):
            return (await subscription.get()).message
    except TimeoutError:
        return None


def _brief(message: Any) -> str:
    fields = {k: v for k, v in message.model_dump().items() if k in ("epoch", "reason", "outcome",
              "decision_id", "highest_epoch", "in_progress")}  # fmt: skip
    return json.dumps(fields)
