"""`edgesplit status` and `status --watch` against a real broker."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from rich.console import Console

from services.cli import main
from services.cli.status_state import StatusSnapshot
from services.cli.status_view import FREE, HELD
from services.cli.watch import watch_status
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import (
    CapacityProfile,
    DecisionRecorded,
    LinkCapacity,
    NodeStatus,
    Plan,
    Segment,
)
from shared.topics import CAPACITY, DECISION_SLOTS, DECISIONS, NODE_STATUS, PLAN


def test_status_with_no_system_says_so_in_one_line(
    broker: LocalBroker, cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["status", "--broker", broker.url, "--cluster", cluster, "--wait-s", "0.3"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "plan: none published" in out and "nodes (0):" in out
    assert err.count("\n") == 1 and "is `edgesplit up` running" in err and cluster in err


# --- status --watch -----------------------------------------------------------------------

EDGESPLIT = [sys.executable, "-m", "services.cli"]
WATCH_DEADLINE_S = 15.0


def _segments(node: str, *ranges: tuple[int, int]) -> tuple[Segment, ...]:
    return tuple(Segment(node=node, start=start, end=end) for start, end in ranges)


def _plan(epoch: int, car_end: int) -> Plan:
    return Plan(epoch=epoch, model_id="tiny-llama", entry_node="car",
                segments=_segments("car", (0, car_end)) + _segments("rsu", (car_end, 8)))  # fmt: skip


async def _publish_site(bus: Bus) -> None:
    """A two-node site as the running system leaves it retained: statuses, profile, plan, decision."""
    for node, trust, ranges in (("car", 2, (0, 4)), ("rsu", 1, (4, 8))):
        await bus.publish(NODE_STATUS, NodeStatus(node=node, state="online", trust=trust,
                          memory_bytes=10**9, threads=1, epoch=1, segments=_segments(node, ranges)),
                          node=node)  # fmt: skip
    link = LinkCapacity(src="car", dst="rsu", bandwidth_bytes_per_s=50e3, latency_s=0.05,
                        health="degraded", degraded=("bandwidth",))  # fmt: skip
    await bus.publish(CAPACITY, CapacityProfile(as_of_s=time.time(), nodes=(), links=(link,)))
    await bus.publish(PLAN, _plan(1, 4))
    decision = DecisionRecorded(decision_id=3, trigger="link_degraded", action="migrate",
                                predicted_gain_s=2.5, outcome="pending")  # fmt: skip
    await bus.publish(DECISIONS, decision, slot=str(3 % DECISION_SLOTS))


def test_watch_draws_the_retained_state_and_redraws_after_a_plan_change(
    broker: LocalBroker, cluster: str
) -> None:
    settings = BusSettings(broker_url=broker.url, cluster=cluster, connect_timeout_s=3.0)
    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=False)
    frames: asyncio.Queue[StatusSnapshot] = asyncio.Queue()

    async def next_frame(ready: Callable[[StatusSnapshot], bool]) -> str:
        async with asyncio.timeout(WATCH_DEADLINE_S):
            while not ready(await frames.get()):
                pass
        return console.export_text()  # what was drawn since the last call

    async def scenario() -> tuple[str, str]:
        async with Bus(settings) as publisher:
            await _publish_site(publisher)
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(
                    watch_status(settings, 0.2, console, on_frame=frames.put_nowait)
                )
                first = await next_frame(lambda s: len(s.nodes) == 2 and bool(s.decisions)
                                         and s.capacity is not None and s.plan is not None)  # fmt: skip
                await publisher.publish(PLAN, _plan(2, 2))
                second = await next_frame(lambda s: s.plan is not None and s.plan.epoch == 2)
                watcher.cancel()
        return first, second

    first, second = asyncio.run(scenario())
    assert f"cluster {cluster}" in first and "plan: epoch 1" in first
    assert "car -> rsu" in first and "DEGRADED (bandwidth)" in first
    car_bar = next(line for line in first.splitlines() if line.startswith("car ") and HELD in line)
    assert "[0,4) entry" in car_bar and car_bar.count(HELD) == car_bar.count(FREE)  # half the blocks
    assert "link_degraded" in first and "2.500" in first and "pending" in first
    assert "plan: epoch 2" in second and "plan: epoch 1" not in second  # a new frame, drawn whole
    car_bar = next(line for line in second.splitlines() if line.startswith("car ") and HELD in line)
    assert "[0,2) entry" in car_bar and 3 * car_bar.count(HELD) == car_bar.count(FREE)
    assert "\x1b[" not in first + second  # not a terminal: no colours, no cursor movement


def test_watch_on_a_terminal_redraws_in_place(broker: LocalBroker, cluster: str) -> None:
    settings = BusSettings(broker_url=broker.url, cluster=cluster, connect_timeout_s=3.0)
    screen = io.StringIO()
    console = Console(file=screen, width=100, height=60, force_terminal=True, color_system="standard")
    epochs: asyncio.Queue[int | None] = asyncio.Queue()

    async def scenario() -> None:
        async with Bus(settings) as publisher:
            await _publish_site(publisher)
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(watch_status(
                    settings, 0.2, console,
                    on_frame=lambda s: epochs.put_nowait(s.plan.epoch if s.plan else None)))  # fmt: skip
                async with asyncio.timeout(WATCH_DEADLINE_S):
                    while await epochs.get() != 1:
                        pass
                    await publisher.publish(PLAN, _plan(2, 2))
                    while await epochs.get() != 2:
                        pass
                watcher.cancel()

    asyncio.run(scenario())
    drawn = screen.getvalue()
    assert "plan: epoch 1" in drawn and "plan: epoch 2" in drawn
    assert "\x1b[2K" in drawn and "\x1b[1A" in drawn  # rich.live erases and moves up, then redraws
    assert drawn.startswith("\x1b[?25l") and drawn.endswith("\x1b[?25h")  # cursor back on exit


def _start_watch(broker: LocalBroker, cluster: str) -> subprocess.Popen[str]:
    """`status --watch` on a pipe, after its first frame with the published plan."""

    async def publish() -> None:
        async with Bus(BusSettings(broker_url=broker.url, cluster=cluster)) as bus:
            await _publish_site(bus)

    asyncio.run(publish())
    watch = subprocess.Popen(
        [*EDGESPLIT, "status", "--watch", "--interval", "0.2", "--broker", broker.url, "--cluster", cluster],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert watch.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + WATCH_DEADLINE_S
    # readline blocks, but the process prints a frame within a second of connecting
    while time.monotonic() < deadline and not any("plan: epoch 1" in line for line in seen):
        line = watch.stdout.readline()
        if not line:
            break
        seen.append(line)
    if not any("plan: epoch 1" in line for line in seen):
        os.killpg(watch.pid, signal.SIGKILL)
        raise AssertionError(f"no first frame within {WATCH_DEADLINE_S} s: {''.join(seen)!r}")
    return watch


def _finish(watch: subprocess.Popen[str]) -> str:
    """Wait for ``watch`` to exit; its stderr."""
    try:
        _, err = watch.communicate(timeout=WATCH_DEADLINE_S)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
    return err


def test_watch_stops_on_ctrl_c_with_status_0(broker: LocalBroker, cluster: str) -> None:
    watch = _start_watch(broker, cluster)
    watch.send_signal(signal.SIGINT)
    err = _finish(watch)
    assert watch.returncode == 0 and "Traceback" not in err, err


def test_watch_ends_quietly_when_its_reader_goes_away(broker: LocalBroker, cluster: str) -> None:
    watch = _start_watch(broker, cluster)
    assert watch.stdout is not None
    watch.stdout.close()  # as `status --watch | head` does after its lines

    async def change_plan() -> None:  # the next frame is written into the closed pipe
        async with Bus(BusSettings(broker_url=broker.url, cluster=cluster)) as bus:
            await bus.publish(PLAN, _plan(2, 2))

    asyncio.run(change_plan())
    assert watch.stderr is not None
    try:
        watch.wait(timeout=WATCH_DEADLINE_S)
        err = watch.stderr.read()
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
    assert watch.returncode == 0 and err == "", err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--watch", "--json"], "not allowed with argument"),
        (["--watch", "--interval", "0.1"], "outside 0.2-60 s"),
        (["--watch", "--interval", "nan"], "outside 0.2-60 s"),
        (["--watch", "--interval", "soon"], "not a number of seconds"),
        (["--interval", "2"], "--interval needs --watch"),
    ],
)
def test_bad_watch_arguments_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["status", *argv])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and message in err, err
