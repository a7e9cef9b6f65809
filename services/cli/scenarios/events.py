"""Applying a scenario's timed events to a running stack.

Link and slowdown events are `EmulationCommand`s to the workers (the same path as
`edgesplit emulate`); kill / restart / join / leave act on the worker processes; a privacy
event publishes the new `PrivacyPolicySet` (except under the static policy, which by
definition ignores run-time changes: its violations are counted, not hidden).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.cli.emulate import Changes, LinkChange, emulate
from services.cli.scenarios.records import EventRecord
from services.cli.scenarios.spec import Event
from services.cli.scenarios.stack import ScenarioStack
from shared.bus import Bus
from shared.errors import EdgesplitError
from shared.messages import PrivacyPolicy, PrivacyPolicySet
from shared.topics import POLICY

EMULATE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PolicyChange:
    at_s: float
    policy: PrivacyPolicy


class EventDriver:
    """Applies the events at their times; records what was applied and when."""

    def __init__(self, stack: ScenarioStack, bus: Bus, events: tuple[Event, ...],
                 clock: Callable[[], float]) -> None:  # fmt: skip
        self.stack = stack
        self.bus = bus
        self.events = events
        self.clock = clock
        self.applied: list[EventRecord] = []
        self.changes: list[tuple[float, str]] = []
        """Every change made to the system (trace points included): candidate causes of re-plans."""
        self.policies: list[PolicyChange] = [PolicyChange(0.0, stack.topology.privacy_policy())]
        self._nodes: dict[str, asyncio.Lock] = {}
        """One command at a time per node: each is the node's state plus a change, numbered
        one above the state's; two at once (two traces through one node) would carry the
        same number, and the node refuses the second as a replay (its change lost)."""

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for event in self.events:
                await self._sleep_until(event.at_s)
                if event.kind == "link_trace":
                    group.create_task(self._trace(event), name=f"trace-{event.src}-{event.dst}")
                    self._note(event, event.describe())
                    continue
                try:
                    detail = await self._apply(event)
                except EdgesplitError as error:
                    self._note(event, event.describe(), error=str(error))
                else:
                    self._note(event, detail)

    async def _sleep_until(self, at_s: float) -> None:
        delay = at_s - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)

    def _note(self, event: Event, description: str, error: str | None = None) -> None:
        at_s = self.clock()
        self.applied.append(EventRecord(at_s, event.kind, description, error))
        if error is None:
            self.changes.append((at_s, description))

    async def _apply(self, event: Event) -> str:
        stack = self.stack
        match event.kind:
            case "link":
                assert event.src is not None and event.dst is not None and event.bandwidth_bytes_per_s
                await self._links(event.src, event.dst, event.bandwidth_bytes_per_s, event.latency_s,
                                  event.one_way)  # fmt: skip
            case "slowdown":
                assert event.node is not None
                await self._emulate(event.node, Changes(slowdown=event.factor))
            case "kill":
                assert event.node is not None
                await asyncio.to_thread(stack.kill, event.node)
            case "leave":
                assert event.node is not None
                await asyncio.to_thread(stack.leave, event.node)
            case "restart" | "join":
                assert event.node is not None
                await asyncio.to_thread(stack.start_worker, event.node)
            case "privacy":
                policy = PrivacyPolicy(private_blocks=event.private_blocks or 0,
                                       trusted_level=event.trusted_level or 0)  # fmt: skip
                self.policies.append(PolicyChange(self.clock(), policy))
                if stack.policy == "static":
                    return f"{event.describe()} (not announced: the static policy ignores run-time changes)"
                await self.bus.publish(POLICY, PrivacyPolicySet(
                    policy=policy, set_at_s=time.time(), reason="scenario event"))  # fmt: skip
        return event.describe()

    async def _links(self, src: str, dst: str, bandwidth: float, latency_s: float | None,
                     one_way: bool) -> None:  # fmt: skip
        ends = [(src, dst)] if one_way else [(src, dst), (dst, src)]
        results = await asyncio.gather(
            *(self._emulate(a, Changes(links=(LinkChange(b, bandwidth, latency_s),))) for a, b in ends),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _emulate(self, node: str, changes: Changes) -> None:
        async with self._nodes.setdefault(node, asyncio.Lock()):
            await emulate(self.stack.settings, node, changes, timeout_s=EMULATE_TIMEOUT_S)

    async def _trace(self, event: Event) -> None:
        """Replay a bandwidth trace from the event's time on; a point that cannot be applied
        (the node is down) is recorded and the trace goes on."""
        assert event.src is not None and event.dst is not None
        start = event.at_s
        for point in event.trace:
            await self._sleep_until(start + point.t_s)
            text = f"trace {event.src}->{event.dst}: {point.bandwidth_bytes_per_s / 1e3:g} kB/s"
            try:
                await self._links(event.src, event.dst, point.bandwidth_bytes_per_s, point.latency_s,
                                  event.one_way)  # fmt: skip
            except EdgesplitError as error:
                self.applied.append(EventRecord(self.clock(), "link_trace", text, str(error)))
            else:
                self.changes.append((self.clock(), text))
