"""Run-time emulation control: a worker's compute slowdown and per-destination link shaping.

This is *emulation* on one machine (see shared/topology.py): the slowdown stretches each
forward, the egress shaper delays frames per destination. The topology file, the
worker's CLI and `edgesplit up` set the start state through the same `apply` as the
`EmulationCommand`s that scenarios and tests publish on ``nodes/{node}/emulation`` while
the worker serves. After each command the worker publishes what it now applies
(`EmulationApplied`, retained), which is also the acknowledgement.

``noise`` re-draws every shaped link's bandwidth and latency and the slowdown by a
random factor in [1 - noise, 1 + noise] every ``NOISE_PERIOD_S`` (the slowdown never
below 1), to test that measurement noise does not raise events.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from services.worker.compute import Slowdown
from services.worker.shaper import EgressSchedule, LinkShape
from shared.errors import EdgesplitError
from shared.messages import EmulatedLink, EmulationApplied, EmulationCommand
from shared.topics import EMULATION, EMULATION_STATE

if TYPE_CHECKING:
    from services.worker.settings import WorkerSettings
    from shared.bus import Bus
    from shared.security.signing import ControlGate

log = logging.getLogger(__name__)

NOISE_PERIOD_S = 0.1


def initial_command(settings: WorkerSettings) -> EmulationCommand:
    """The start state from the settings (topology file, --slowdown, --links) as a command."""
    links = tuple(
        EmulatedLink(dst=dst, bandwidth_bytes_per_s=bandwidth, latency_s=latency_s)  # type: ignore[arg-type]
        for dst, (bandwidth, latency_s) in sorted(settings.link_shapes.items())
    )
    return EmulationCommand(command_id=0, slowdown=settings.slowdown, links=links, reset_links=True)


class Emulation:
    """Applies emulation commands to a worker's `Slowdown` and `EgressSchedule`."""

    def __init__(self, node: str, slowdown: Slowdown, schedule: EgressSchedule,
                 rng: random.Random | None = None) -> None:  # fmt: skip
        self.node = node
        self._slowdown, self._schedule = slowdown, schedule
        self.gate: ControlGate | None = None
        """Checks each command's signature (None: accept every one)."""
        self._rng = rng or random.Random()
        self.base_slowdown = slowdown.factor
        self.links: dict[str, EmulatedLink] = {}
        self.noise = 0.0
        self.command_id = 0

    def fresh(self, command: EmulationCommand) -> bool:
        """Replay fencing: a command is applied only if its ``command_id`` is above the
        last one applied (`edgesplit emulate` sends the node's current id + 1); an older
        or repeated one, a genuine command replayed, is refused and counted
        (``EmulationCommand_replayed`` in the node's status). This memory ends with the
        process; what survives a restart is the gate's age bound, checked before
        (``EmulationCommand_stale``: issued more than ``max_message_age_s`` ago)."""
        if command.command_id > self.command_id:
            return True
        if self.gate is not None:
            self.gate.refuse(command, "replayed", f"command {command.command_id} <= applied {self.command_id}")
        else:
            log.warning("%s: emulation command %d refused: not above %d (a replay)", self.node,
                        command.command_id, self.command_id)  # fmt: skip
        return False

    def apply(self, command: EmulationCommand) -> EmulationApplied:
        """Apply ``command`` now; returns the resulting state."""
        if command.reset_links:
            for dst in list(self.links):
                self._schedule.set_shape(dst, LinkShape())
            self.links.clear()
        for link in command.links:
            self.links[link.dst] = link
            self._schedule.set_shape(link.dst, LinkShape(link.bandwidth_bytes_per_s, link.latency_s))
        if command.slowdown is not None:
            self.base_slowdown = command.slowdown
            self._slowdown.set(command.slowdown)
        if command.noise is not None:
            self.noise = command.noise
            if self.noise == 0:
                self.redraw(exact=True)
        self.command_id = command.command_id
        return self.state()

    def state(self) -> EmulationApplied:
        return EmulationApplied(
            node=self.node,  # type: ignore[arg-type]
            command_id=self.command_id,
            slowdown=self.base_slowdown,
            links=tuple(self.links[dst] for dst in sorted(self.links)),
            noise=self.noise,
        )

    def redraw(self, exact: bool = False) -> None:
        """Set every shape and the slowdown to its base value times a fresh noise factor
        (``exact``: factor 1, no noise)."""

        def factor() -> float:
            return 1.0 if exact else self._rng.uniform(1 - self.noise, 1 + self.noise)

        for dst, link in self.links.items():
            bandwidth = link.bandwidth_bytes_per_s
            self._schedule.set_shape(dst, LinkShape(
                bandwidth * factor() if bandwidth is not None else None, link.latency_s * factor()
            ))  # fmt: skip
        self._slowdown.set(self.base_slowdown * factor())

    async def run(self, bus: Bus) -> None:
        """Publish the state, then follow commands (and re-draw noise) until cancelled."""
        async with asyncio.TaskGroup() as task_group:
            task_group.create_task(self._follow(bus), name="emulation")
            task_group.create_task(self._noise(), name="emulation-noise")

    async def _follow(self, bus: Bus) -> None:
        async with bus.subscribe(EMULATION, node=self.node) as commands:
            await self._publish(bus)
            async for _, command in commands:
                if self.gate is not None and not (self.gate.signed(command) and self.gate.current(command)):
                    continue  # unsigned, forged, or issued longer ago than max_message_age_s
                if not self.fresh(command):
                    continue
                try:
                    self.apply(command)
                except (ValueError, TypeError) as error:  # e.g. an invalid shape
                    log.warning("%s: emulation command %d refused: %s", self.node, command.command_id, error)
                    continue
                log.info("%s: emulation %d: slowdown %.2f, links %s, noise %.2f", self.node,
                         command.command_id, self.base_slowdown,
                         {dst: (link.bandwidth_bytes_per_s, link.latency_s) for dst, link in self.links.items()},
                         self.noise)  # fmt: skip
                await self._publish(bus)

    async def _publish(self, bus: Bus) -> None:
        try:
            await bus.publish(EMULATION_STATE, self.state(), node=self.node)
        except EdgesplitError as error:
            log.warning("%s: emulation state not published: %s", self.node, error)

    async def _noise(self) -> None:
        while True:
            await asyncio.sleep(NOISE_PERIOD_S)
            if self.noise > 0:
                self.redraw()
