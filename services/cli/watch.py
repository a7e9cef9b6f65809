"""`edgesplit status --watch`: one bus connection, the status topics followed, the view redrawn.

On a terminal the view (services/cli/status_view.py) is redrawn in place every
``interval_s`` with `rich.live.Live`, so ages and measured numbers stay current. When
stdout is not a terminal (a pipe, a file) there is no cursor to move: the whole view is
printed plainly, without colours or control codes, once at start and again whenever
something structural changed (`StatusSnapshot.structure`: node states, epochs and
segments, the plan, link health, decisions and their outcomes, the policy, emulations),
at most once per interval. Cancellation (Ctrl-C) ends it; the last frame stays on screen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.rule import Rule

from services.cli.status_state import StatusSnapshot
from services.cli.status_view import render_status
from shared.bus import Bus, Subscription
from shared.config import BusSettings
from shared.errors import BusError
from shared.topics import (
    CAPACITY,
    DECISIONS,
    EMULATION_STATE,
    NODE_STATUS,
    PLAN,
    POLICY,
    SERVICE_STATUS,
    TELEMETRY,
)

WATCHED_TOPICS = (NODE_STATUS, CAPACITY, PLAN, DECISIONS, POLICY, EMULATION_STATE, TELEMETRY, SERVICE_STATUS)
SETTLE_S = 0.5
"""Before the first frame, wait up to this long (seconds) for the retained messages."""
READY_TIMEOUT_S = 10.0
"""How long the first frame waits for the broker to confirm the subscriptions (seconds)."""

FrameHook = Callable[[StatusSnapshot], None]


class WatchConsole(Console):
    """A rich Console whose broken pipe (``status --watch | head``) is a BrokenPipeError.

    rich raises SystemExit(1) there, which would escape the task group as a base
    exception and end with a traceback; the `edgesplit` command treats a reader that
    went away as a normal end (status 0). rich has already pointed stdout at /dev/null,
    so nothing fails again at exit.
    """

    def on_broken_pipe(self) -> None:
        try:
            super().on_broken_pipe()
        except SystemExit:
            raise BrokenPipeError("the reader of stdout went away") from None


async def watch_status(
    settings: BusSettings, interval_s: float, console: Console, *, on_frame: FrameHook | None = None
) -> None:
    """Follow the cluster of ``settings`` and draw on ``console`` until cancelled.

    ``interval_s``: seconds between redraws. ``on_frame`` is called with the snapshot
    after each frame drawn (an embedding program or a test learns what was shown).
    Raises BrokerUnavailable when no broker answers; later disconnections are shown in
    the view while the bus reconnects.
    """
    snapshot = StatusSnapshot(broker=settings.broker.redacted(), cluster=settings.cluster)
    changed = asyncio.Event()
    async with Bus(settings) as bus:
        subscriptions: list[Subscription[Any]] = [bus.subscribe(topic) for topic in WATCHED_TOPICS]
        try:
            async with asyncio.TaskGroup() as group:
                for subscription in subscriptions:
                    group.create_task(_follow(subscription, snapshot, changed))
                group.create_task(_draw(bus, snapshot, changed, interval_s, console, on_frame))
        finally:
            for subscription in subscriptions:
                subscription.close()


async def _follow(subscription: Subscription[Any], snapshot: StatusSnapshot, changed: asyncio.Event) -> None:
    async for delivery in subscription:
        if snapshot.apply(delivery.message):
            changed.set()


async def _draw(
    bus: Bus, snapshot: StatusSnapshot, changed: asyncio.Event, interval_s: float,
    console: Console, on_frame: FrameHook | None,
) -> None:  # fmt: skip
    try:
        await bus.wait_ready(timeout_s=READY_TIMEOUT_S)
    except BusError:
        pass  # draw anyway: the header says the bus is reconnecting
    await _settle(changed, min(interval_s, SETTLE_S))
    if console.is_terminal and not console.is_dumb_terminal:
        await _draw_live(bus, snapshot, interval_s, console, on_frame)
    else:
        await _draw_plain(bus, snapshot, changed, interval_s, console, on_frame)


async def _settle(changed: asyncio.Event, quiet_s: float) -> None:
    """Wait until no message arrived for a short while (the retained burst), at most ``quiet_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + quiet_s
    while (remaining := deadline - loop.time()) > 0:
        changed.clear()
        try:
            async with asyncio.timeout(min(remaining, 0.1)):
                await changed.wait()
        except TimeoutError:
            return


async def _draw_live(
    bus: Bus, snapshot: StatusSnapshot, interval_s: float, console: Console,
    on_frame: FrameHook | None,
) -> None:  # fmt: skip
    # auto_refresh off: rich's refresh thread would draw while messages are applied.
    with Live(console=console, auto_refresh=False, redirect_stdout=False,
              redirect_stderr=False) as live:  # fmt: skip
        while True:
            snapshot.connected = bus.ready.is_set()
            live.update(render_status(snapshot, time.time()), refresh=True)
            if on_frame is not None:
                on_frame(snapshot)
            await asyncio.sleep(interval_s)  # pacing, not synchronisation


async def _draw_plain(
    bus: Bus, snapshot: StatusSnapshot, changed: asyncio.Event, interval_s: float,
    console: Console, on_frame: FrameHook | None,
) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    while True:
        snapshot.connected = bus.ready.is_set()
        shown = snapshot.structure()
        now_s = time.time()
        console.print(Rule(time.strftime("%H:%M:%S", time.localtime(now_s)), style="dim"))
        console.print(render_status(snapshot, now_s))
        if on_frame is not None:
            on_frame(snapshot)
        drawn_at = loop.time()
        while True:
            changed.clear()
            try:  # a reconnect changes no message: look again after an interval anyway
                async with asyncio.timeout(interval_s):
                    await changed.wait()
            except TimeoutError:
                pass
            snapshot.connected = bus.ready.is_set()
            if snapshot.structure() != shown:
                break
        await asyncio.sleep(max(0.0, drawn_at + interval_s - loop.time()))  # at most one frame per interval
