"""The monitor service: statuses and telemetry in, capacity profile and events out.

It subscribes to every node's retained status (birth / Last Will) and telemetry, feeds
them to the pure `MonitorState`, publishes the capacity profile retained every
``profile_period_s`` and each event (NodeJoined, NodeDown, NodeOverloaded, LinkDegraded,
LinkRecovered, ...) on the events topic as it happens. On start it reads the previous
monitor's retained profile so a restart neither forgets nodes nor repeats NodeJoined.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import Field

from services.monitor.detect import MonitorConfig
from services.monitor.logic import MonitorState
from shared.bus import Bus
from shared.config import BusSettings
from shared.errors import ConfigError, EdgesplitError
from shared.messages import CapacityProfile, LayerCost, Message, NodeStatus, Telemetry
from shared.metrics import ServiceMetrics, message_readings, profile_readings
from shared.security.reporting import report_refusals
from shared.security.trust import TrustRegistry, load_trust
from shared.topics import CAPACITY, NODE_STATUS, PROFILE_EVENTS, TELEMETRY, Topic

P = TypeVar("P")

log = logging.getLogger(__name__)
TRUST_IGNORED = "NodeStatus_trust_ignored"
"""Counter: statuses whose trust claim differs from the registry (the registry wins)."""


class MonitorSettings(BusSettings):
    """The monitor process. Units in field names."""

    profile_period_s: float = Field(default=1.0, gt=0, description="retained profile period")
    heartbeat_timeout_s: float = Field(default=3.0, gt=0, description="silent this long: down")
    persist_s: float = Field(default=3.0, ge=0, description="a change must hold this long")
    links: tuple[tuple[str, str], ...] | None = Field(
        default=None, description="directed node pairs that may exchange activations (None: all)"
    )
    symmetric_links: tuple[tuple[str, str], ...] = Field(
        default=(), description="node pairs whose link the topology declares symmetric (one medium)")
    shards_dir: Path | None = Field(default=None, description="shard store: layer costs")
    seed_wait_s: float = Field(default=0.5, ge=0, description="wait for the retained profile")


def load_layer_costs(shards_dir: Path) -> tuple[str, tuple[LayerCost, ...]]:
    """(model name, per-block costs) from a shard store's manifest.json (no torch needed).

    Raises ConfigError when the manifest is missing or lacks the cost fields.
    """
    path = Path(shards_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        layers = tuple(
            LayerCost(index=block["index"], flops_per_token=float(block["flops_per_token"]),
                      activation_bytes_per_token=block["activation_bytes_per_token"],
                      kv_bytes_per_token=block["kv_bytes_per_token"], weight_bytes=block["bytes"])
            for block in manifest["blocks"]
        )  # fmt: skip
        return str(manifest.get("model_name", ""))[:1024], layers
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"cannot read layer costs from {path}: {error}") from None


async def publish(bus: Bus, topic: Topic[P], message: P) -> None:
    """``bus.publish`` that never swallows a cancellation.

    aiomqtt waits for the PUBACK with ``asyncio.wait_for``, which in Python 3.11 returns
    the result instead of raising when a cancellation races with the reply (measured: 42
    of 3000 cancelled QoS 1 publishes). A publishing loop that lost its cancellation that
    way ran on after SIGTERM and the monitor never exited; so the lost cancellation is
    raised again here (``Task.cancelling()`` still counts it).
    """
    await bus.publish(topic, message)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class MonitorService:
    """Constructor does no I/O; ``run()`` serves until cancelled. ``clock`` gives Unix seconds."""

    def __init__(self, settings: MonitorSettings, clock: Callable[[], float] = time.time,
                 layers: tuple[LayerCost, ...] = (), model_id: str = "") -> None:  # fmt: skip
        self.settings = settings
        self.clock = clock
        config = MonitorConfig(heartbeat_timeout_s=settings.heartbeat_timeout_s,
                               persist_s=settings.persist_s)  # fmt: skip
        self.state = MonitorState(config, settings.links, layers, model_id, settings.symmetric_links)
        self.counters: Counter[str] = Counter()
        self.trust: TrustRegistry | None = None
        """Each node's trust from the operator's registry (None: as its status claims)."""
        self.ready = asyncio.Event()
        """Set once the first profile is published."""
        self._events: asyncio.Queue[Message] = asyncio.Queue(maxsize=10_000)
        self.metrics = ServiceMetrics("monitor")
        self.profile: CapacityProfile | None = None
        """The newest profile published (its metrics)."""

    async def run(self) -> None:
        self.trust = await asyncio.to_thread(load_trust, self.settings.identities_file)
        async with (self.metrics.served(self.settings),
                    Bus(self.settings, origin=self.settings.client_id or "monitor") as bus):  # fmt: skip
            self.metrics.add_reader(lambda: [*message_readings(bus.counters), *profile_readings(self.profile)])
            await self._seed(bus)
            async with asyncio.TaskGroup() as task_group:
                task_group.create_task(self._follow_statuses(bus), name="statuses")
                task_group.create_task(self._follow_telemetry(bus), name="telemetry")
                task_group.create_task(self._publish_events(bus), name="events")
                task_group.create_task(self._publish_profiles(bus), name="profiles")
                task_group.create_task(report_refusals(bus, self.settings.client_id or "monitor", lambda: {
                    k: v for k, v in self.counters.items() if k == TRUST_IGNORED}), name="refusals")  # fmt: skip

    async def _seed(self, bus: Bus) -> None:
        async with bus.subscribe(CAPACITY) as previous:
            try:
                async with asyncio.timeout(self.settings.seed_wait_s):
                    _, profile = await previous.get()
            except TimeoutError:
                return
        self.state.seed(profile, self.clock())
        log.info("seeded from the retained profile of %.1f s ago (%d nodes, %d links)",
                 self.clock() - profile.as_of_s, len(profile.nodes), len(profile.links))  # fmt: skip

    async def _follow_statuses(self, bus: Bus) -> None:
        async with bus.subscribe(NODE_STATUS) as statuses:
            async for params, status in statuses:
                self._guarded("status", params.get("node", ""), status, self._on_status)

    async def _follow_telemetry(self, bus: Bus) -> None:
        async with bus.subscribe(TELEMETRY) as telemetry:
            async for params, sample in telemetry:
                self._guarded("telemetry", params.get("node", ""), sample, self._on_telemetry)

    def _guarded(self, what: str, node: str, message: NodeStatus | Telemetry,
                 handler: Callable[[NodeStatus | Telemetry], list[Message]]) -> None:  # fmt: skip
        """Run a handler; a message that is inconsistent or breaks it is logged and dropped."""
        try:
            if message.node != node:
                raise ValueError(f"{what} of node {message.node!r} on the topic of {node!r}")
            events = handler(message)
        except Exception as error:  # one bad message never stops the monitor
            self.counters[f"dropped_{what}"] += 1
            log.warning("dropped %s from %s: %s: %s", what, node, type(error).__name__, error)
            return
        for event in events:
            self._emit(event)

    def _on_status(self, message: NodeStatus | Telemetry) -> list[Message]:
        assert isinstance(message, NodeStatus)
        if self.trust is not None and message.trust != self.trust.trust_of(message.node):
            self.counters[TRUST_IGNORED] += 1  # the registry's trust is used
        return self.state.on_status(message, self.clock())

    def _on_telemetry(self, message: NodeStatus | Telemetry) -> list[Message]:
        assert isinstance(message, Telemetry)
        return self.state.on_telemetry(message, self.clock())

    def _emit(self, event: Message) -> None:
        log.info("event %s %s", event.kind, event.model_dump(mode="json", exclude={"evidence"}))
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self.counters["events_dropped"] += 1

    async def _publish_events(self, bus: Bus) -> None:
        while True:
            event = await self._events.get()
            try:
                await publish(bus, PROFILE_EVENTS, event)  # type: ignore[arg-type,misc]
            except EdgesplitError as error:
                log.warning("event %s not published: %s", event.kind, error)

    async def _publish_profiles(self, bus: Bus) -> None:
        """Heartbeat checks and the retained profile, every ``profile_period_s``."""
        period_s = self.settings.profile_period_s
        tick_s = min(0.1, period_s)
        next_profile_s = 0.0
        while True:
            now_s = self.clock()
            for event in self.state.tick(now_s):
                self._emit(event)
            if now_s >= next_profile_s or self.state.urgent:  # a link got worse: publish now
                next_profile_s = now_s + period_s
                self.state.urgent = False
                try:
                    profile = self.state.profile(now_s)
                    profile = self.trust.apply(profile) if self.trust else profile
                    await publish(bus, CAPACITY, profile)
                    self.profile = profile
                    self.ready.set()
                except EdgesplitError as error:
                    log.warning("profile not published: %s", error)
            await asyncio.sleep(tick_s)
