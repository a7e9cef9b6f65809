"""What a worker knows about the health of the system around it, and what it does about it.

- Node liveness: a Last Will (offline status) or the monitor's NodeDown fails the entry's
  passes waiting on that node at once; an online status or NodeJoined marks it up again.
- The orchestrator's verdict: an emergency decision that found no feasible plan fails
  requests waiting for a re-plan at once, with its reason (``no_plan``).
- The broker: after a reconnect the passes that were in flight are replayed at once.
- Its own process: an event-loop stall (SIGSTOP) longer than ``stall_s`` means it was
  declared down and replaced meanwhile; it drops its KV state and rejoins fresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from services.worker.dataplane import DataPlane, NoPlan
from services.worker.epochs import EpochKeeper
from shared.bus import Bus, Subscription
from shared.messages import DecisionRecorded, NodeDown, NodeJoined, NodeStatus
from shared.security.signing import ControlGate
from shared.topics import DECISIONS, NODE_STATUS, PROFILE_EVENTS

log = logging.getLogger(__name__)


class Health:
    """Liveness of the other nodes, no-plan verdicts, reconnects and stalls of one worker."""

    def __init__(self, node: str, data: DataPlane, keeper: EpochKeeper, stall_s: float,
                 counters: Counter[str]) -> None:  # fmt: skip
        self.node, self.data, self.keeper = node, data, keeper
        self.stall_s = stall_s
        self.counters = counters
        self._epoch_changed = asyncio.Event()  # replaced (and the old one set) on each commit
        self._changed = asyncio.Event()  # replaced (and the old one set) on each up/down/verdict
        self._no_plan: tuple[float, str] | None = None  # (monotonic s, the orchestrator's reason)
        self._committed_at = 0.0  # monotonic s of the last epoch switch
        self.kv_budgets: dict[str, int | None] = {}
        """Other nodes' KV budgets, as their (retained) statuses announce them."""
        self.gate: ControlGate | None = None
        """Checks the signatures of NodeDown / NodeJoined and decisions (None: accept all)."""

    def epoch_committed(self) -> None:
        self._committed_at = time.monotonic()
        self._notify_epoch()

    def _notify_epoch(self) -> None:
        changed, self._epoch_changed = self._epoch_changed, asyncio.Event()
        changed.set()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_for_epoch_after(self, epoch: int | None, timeout_s: float) -> bool:
        """Wait until an epoch other than ``epoch`` is committed, or every node of the
        committed pipeline is up again (it came back: replay on the same epoch); False on
        the deadline. Raises NoPlan when the orchestrator found no plan without the node."""
        began = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                while self.keeper.epoch == epoch:
                    current = self.keeper.current
                    if current is not None and not self.data.down.intersection(current.route.nodes()):
                        break
                    if self._no_plan is not None and self._no_plan[0] >= max(began - timeout_s, self._committed_at):
                        raise NoPlan(f"no feasible plan without the lost node: {self._no_plan[1]}")
                    epoch_changed = asyncio.ensure_future(self._epoch_changed.wait())
                    changed = asyncio.ensure_future(self._changed.wait())
                    try:
                        await asyncio.wait({epoch_changed, changed}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        epoch_changed.cancel()
                        changed.cancel()
        except TimeoutError:
            return False
        return True

    async def follow(self, bus: Bus) -> None:
        """Node statuses, monitor events and orchestrator decisions, until cancelled."""
        async with (bus.subscribe(NODE_STATUS) as statuses, bus.subscribe(PROFILE_EVENTS) as events,
                    bus.subscribe(DECISIONS) as decisions, asyncio.TaskGroup() as group):  # fmt: skip
            for subscription in (statuses, events, decisions):
                group.create_task(self._follow(subscription))

    async def _follow(self, subscription: Subscription[Any]) -> None:
        async for delivery in subscription:
            message = delivery.message
            if self.gate is not None and not (self.gate.signed(message)
                                              and self.gate.current(message, delivery.retained)):
                continue  # a forged or replayed NodeDown or decision record must not fail passes
            if isinstance(message, DecisionRecorded):
                self._on_decision(message, delivery.retained)
                continue
            node = getattr(message, "node", None)
            if node is None or node == self.node:
                continue
            if isinstance(message, NodeStatus):
                self.kv_budgets[node] = message.kv_budget_bytes
                if message.frame_public_key and delivery.params.get("node") == node:  # its own topic
                    self.data.auth.peers.learn(node, message.frame_public_key)
            if isinstance(message, NodeDown) or (isinstance(message, NodeStatus) and message.state == "offline"):
                failed = self.data.node_down(node)
                if failed:
                    log.info("%s: node %s is down; %d passes fail over", self.node, node, failed)
            elif isinstance(message, NodeJoined) or (isinstance(message, NodeStatus) and message.state == "online"):
                sent_at = delivery.envelope.sent_at_s if delivery.envelope is not None else None
                self.data.node_up(node, sent_at if isinstance(message, NodeStatus) else None)
            else:
                continue
            self._notify()

    def _on_decision(self, record: DecisionRecorded, retained: bool) -> None:
        """The orchestrator found no feasible plan in an emergency: passes waiting for a
        new epoch fail at once with its reason instead of at the failover deadline."""
        if retained or not (record.emergency and record.action == "keep" and "no feasible plan" in record.reason):
            return
        self._no_plan = (time.monotonic(), record.reason)
        self._notify()

    async def watch_reconnects(self, bus: Bus) -> None:
        """After each reconnect to the broker, replay the passes that were in flight."""
        seen, lost_at_s = bus.sessions, time.time()
        while True:
            await asyncio.sleep(0.1)
            if not bus.ready.is_set():
                lost_at_s = min(lost_at_s, time.time())
                continue
            if bus.sessions == seen:
                lost_at_s = time.time()
                continue
            seen = bus.sessions
            failed = self.data.reconnected(lost_at_s)
            lost_at_s = time.time()
            if failed:
                log.info("%s: reconnected to the broker; %d passes replay", self.node, failed)

    async def watch_stalls(self) -> None:
        """A process stopped (SIGSTOP) or starved longer than ``stall_s`` was declared
        down meanwhile and replaced: it rejoins fresh. Its KV caches and drained epochs
        go, so frames it still holds find no state (answered kv_missing, which the entry
        drops as unexpected) and nothing it computed before the stall is reused."""
        tick_s = min(0.25, self.stall_s / 4)
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            if now - last > self.stall_s:
                self.counters["stalls"] += 1
                freed = sum(len(host.sweep(0.0)) for host in self.keeper.hosts())
                self.keeper.draining.clear()
                log.warning("%s: stalled for %.1f s; dropped %d KV caches and drained epochs, "
                            "rejoining fresh", self.node, now - last, freed)  # fmt: skip
            last = now
