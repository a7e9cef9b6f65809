"""What the runner watches on a policy's broker while it runs: the plan in force (which
node holds which blocks), the orchestrator's decisions (re-plans) and each node's load."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from services.cli.scenarios.records import Placement, UtilisationSample
from shared.bus import Bus, Subscription
from shared.errors import ServingError
from shared.messages import DecisionRecorded, NodeStatus, Plan, Telemetry
from shared.topics import DECISIONS, NODE_STATUS, PLAN, TELEMETRY


@dataclass
class SeenDecision:
    """A decision that changed the plan, as last published, and when its commit was seen."""

    record: DecisionRecorded
    committed_at_s: float | None = None


class Observer:
    """Collects plans, decisions and utilisation until cancelled."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.placements: list[Placement] = []
        self.plans: list[tuple[float, Plan]] = []
        self.decisions: dict[int, SeenDecision] = {}
        self.utilisation: list[UtilisationSample] = []
        self._epoch = -1

    def on_plan(self, plan: Plan) -> None:
        if plan.epoch <= self._epoch:
            return
        self._epoch = plan.epoch
        at_s = max(0.0, self.clock())
        self.plans.append((at_s, plan))
        for segment in plan.segments:
            self.placements.append(Placement(at_s, str(segment.node), segment.start, segment.end, plan.epoch))

    def on_decision(self, record: DecisionRecorded) -> None:
        if record.action == "keep" or record.from_epoch is None:
            return  # keeps, and the first plan, are not re-plans
        seen = self.decisions.get(record.decision_id)
        if seen is None:
            seen = self.decisions[record.decision_id] = SeenDecision(record)
        seen.record = record
        if record.outcome == "committed" and seen.committed_at_s is None:
            seen.committed_at_s = self.clock()

    async def run(self, bus: Bus) -> None:
        async with (
            bus.subscribe(PLAN) as plans,
            bus.subscribe(DECISIONS) as decisions,
            bus.subscribe(TELEMETRY) as telemetry,
            asyncio.TaskGroup() as group,
        ):
            group.create_task(self._plans(plans))
            group.create_task(self._decisions(decisions))
            group.create_task(self._telemetry(telemetry))

    async def _plans(self, subscription: Subscription[Plan]) -> None:
        async for _, plan in subscription:
            self.on_plan(plan)

    async def _decisions(self, subscription: Subscription[DecisionRecorded]) -> None:
        async for _, record in subscription:
            self.on_decision(record)

    async def _telemetry(self, subscription: Subscription[Telemetry]) -> None:
        async for _, sample in subscription:
            self.utilisation.append(UtilisationSample(self.clock(), str(sample.node), float(sample.compute_busy)))


async def wait_until_served(bus: Bus, timeout_s: float, dead: Callable[[], str | None]) -> Plan:
    """The retained plan once every node in it reports serving its epoch.

    Raises ServingError when a control service exits or nothing is served in time.
    """
    plan: Plan | None = None
    statuses: dict[str, NodeStatus] = {}
    async with bus.subscribe(PLAN) as plans, bus.subscribe(NODE_STATUS) as nodes:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            for subscription in (plans, nodes):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25):
                        _, message = await subscription.get()
                        if isinstance(message, Plan):
                            plan = message
                        elif isinstance(message, NodeStatus):
                            statuses[str(message.node)] = message
            if plan is not None and _served(plan, statuses):
                return plan
            gone = dead()
            if gone is not None:
                raise ServingError(f"{gone} exited before the first plan was served")
    raise ServingError(f"no plan was committed and served within {timeout_s:g} s")


def _served(plan: Plan, statuses: dict[str, NodeStatus]) -> bool:
    nodes = {str(plan.entry_node), *(str(s.node) for s in plan.segments)}
    return all(
        node in statuses and statuses[node].state == "online" and statuses[node].epoch == plan.epoch
        for node in nodes
    )
