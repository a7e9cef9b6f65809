"""Slow tier of the fault-tolerance acceptance: repeated kills, a re-split with shard
loading, a second kill during recovery, and a soak with a random fault every 10 s under
steady load (lost = duplicated = hung = 0; long-lived services' memory stays flat)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from shared.broker import LocalBroker
from shared.bus import Bus
from shared.errors import EdgesplitError, NoAnswer, StageTimedOut
from shared.messages import EmulatedLink, EmulationCommand
from shared.topics import EMULATION
from tests.integration.fullstack import Stack, topology_text
from tests.integration.pressure import rss_kb
from tests.integration.test_fault_tolerance import (
    BLOCKS_2,
    SPARE,
    Load,
    a_worker,
    assert_bounded,
    kill_middle_while_decoding,
    middle,
    stack_for,
    wait_linked,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(900)
def test_kill_middle_twenty_times(broker: LocalBroker, tmp_path: Path) -> None:
    stack = stack_for(broker, tmp_path)
    waits: list[float] = []
    try:
        stack.start()
        for round_ in range(20):
            resumed_s, before, after = asyncio.run(kill_middle_while_decoding(stack, 4, 40, tag=f"k{round_}-"))
            waits.append(resumed_s)
            stack.start_worker(middle(before))  # back as a fresh spare for the next round
            asyncio.run(wait_linked(stack, middle(before)))
    finally:
        stack.stop()
    print(f"20 kills: 0 lost; kill -> next token median {sorted(waits)[10]:.2f} s, worst {max(waits):.2f} s")
    assert max(waits) < 3.5, waits


@pytest.mark.timeout(300)
def test_no_spare_node_resplit_with_shard_load(broker: LocalBroker, tmp_path: Path) -> None:
    """Three nodes; the one holding the middle dies; the survivors hold no copy of its
    blocks, so the plan is re-split and the blocks loaded from the shard store."""
    nodes = (("car", 2, 0.5, BLOCKS_2), ("rsu", 1, 1.0, BLOCKS_2), ("mec", 0, 0.05, 2 * BLOCKS_2))
    stack = stack_for(broker, tmp_path, nodes)
    stack.one_way = (("rsu", "mec"),)  # no mec -> rsu: rsu holds the middle
    stack.topology.write_text(topology_text(stack.nodes, stack.entry, one_way=stack.one_way))
    try:
        plan = stack.start()
        assert len(plan.segments) == 3, plan.segments
        resumed_s, before, after = asyncio.run(kill_middle_while_decoding(stack, 4, 60))
    finally:
        stack.stop()
    cuts = [(s.start, s.end) for s in after.segments]
    print(f"re-split {[(s.node, s.start, s.end) for s in before.segments]} -> "
          f"{[(s.node, s.start, s.end) for s in after.segments]}: next token after {resumed_s:.2f} s")  # fmt: skip
    assert cuts != [(s.start, s.end) for s in before.segments]
    assert resumed_s < 10.0


BLOCKS_3 = 570e3
"""Memory for three blocks of the tiny model (148,920 bytes each) and their caches."""


@pytest.mark.timeout(300)
def test_second_kill_during_recovery(broker: LocalBroker, tmp_path: Path) -> None:
    """Two of four nodes die 0.3 s apart under load. Each node holds three of the six
    blocks, so the entry and the one survivor can still serve the model (with two
    blocks per node, as before, no plan was left: measured 2026-12-06, all 4 requests
    ended in NoFeasiblePlan and the test passed, as it allowed any typed error)."""
    nodes = tuple((name, trust, speed, BLOCKS_3) for name, trust, speed, _ in SPARE)
    stack = stack_for(broker, tmp_path, nodes)

    async def scenario() -> tuple[int, int, list[BaseException]]:
        plan = await stack.current_plan()
        first = a_worker(plan)
        second = next(n for n, *_ in stack.nodes if n not in {first, plan.entry_node})
        load = Load(stack, 4, 60, timeout_s=30)
        load.start()
        await load.until_tokens(5)
        stack.kill(first)
        await asyncio.sleep(0.3)  # the re-plan around it is under way
        stack.kill(second)
        return await load.results()  # asserts none outlived its deadline

    try:
        stack.start()
        good, wrong, typed = asyncio.run(scenario())
    finally:
        stack.stop()
    print(f"second kill during recovery: {good} complete, {len(typed)} typed errors {typed[:2]}")
    # Measured 2026-12-06, three blocks per node: 1 run in 5 failed with 4 typed errors
    # (all StageTimedOut: "node mec went down ...; no new plan within 10.0 s"). The second
    # victim was in the recovery plan: the broadcaster's PrepareEpoch for it went
    # unanswered and the rollout waited out its 60 s READY deadline, longer than the entry
    # waits for a new plan (10 s). Fixed: a node of the rollout going down (Last Will, or
    # the monitor's NodeDown) aborts it at once and the orchestrator re-plans around both
    # (services/broadcaster/logic.py: NodeLost; docs/RELIABILITY.md). The bound is what
    # the design promises: at most 1 request (one whose pass was in flight at the second
    # kill) may time out; the rest complete with the unsplit model's tokens.
    assert_bounded((good, wrong, typed), 4, at_most=1, allowed=(StageTimedOut, NoAnswer))


class Soak:
    """Steady load (``streams`` clients, one request after another) with outcome counts."""

    def __init__(self, stack: Stack, streams: int) -> None:
        self.stack, self.streams = stack, streams
        self.counts: Counter[str] = Counter()
        self.running = True

    async def stream(self, index: int) -> None:
        serial = 0
        while self.running:
            serial += 1
            prompt = [(7 * index + serial) % 390 + 2, (13 * serial) % 390 + 2, 5]
            arrivals: list[tuple[int, float]] = []
            began = time.monotonic()
            try:
                result = await self.stack.generate(f"s{index}-{serial}", prompt, 30, 30.0, arrivals)
            except NoAnswer:
                self.counts["lost"] += 1
                continue
            except EdgesplitError as error:
                self.counts[f"typed:{type(error).__name__}"] += 1
                await asyncio.sleep(1.0)  # a client backs off after a refusal, as users do
                continue
            finally:
                if time.monotonic() - began > 35.0:
                    self.counts["hung"] += 1
            indices = [i for i, _ in arrivals]
            if indices != list(range(len(result.token_ids))):
                self.counts["duplicated_or_gapped"] += 1
            elif result.token_ids != self.stack.expected(prompt, 30):
                self.counts["wrong"] += 1
            else:
                self.counts["complete"] += 1


class MemoryLog:
    """VmRSS of every process of the stack and of the broker, sampled every ``interval_s``
    on a thread, one series per (name, pid): a restarted process starts a new series."""

    def __init__(self, stack: Stack, broker: LocalBroker, interval_s: float = 5.0) -> None:
        self.stack, self.broker, self.interval_s = stack, broker, interval_s
        self.series: dict[tuple[str, int], list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-log", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            named = [(name, process.pid) for name, process in list(self.stack.processes.items())
                     if process.poll() is None]  # fmt: skip
            if self.broker.process is not None and self.broker.process.poll() is None:
                named.append(("mosquitto", self.broker.process.pid))
            for name, pid in named:
                value = rss_kb(pid)
                if value:
                    self.series.setdefault((name, pid), []).append((now, value))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemoryLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def per_minute(self, key: tuple[str, int]) -> list[int]:
        """The series' VmRSS in KiB at each whole minute after its first sample."""
        samples = self.series[key]
        picked: dict[int, int] = {}
        for at_s, kb in samples:
            picked.setdefault(int((at_s - samples[0][0]) // 60), kb)
        return [picked[minute] for minute in sorted(picked)]

    def after_first_minute(self) -> dict[tuple[str, int], tuple[int, int, float]]:
        """Per series with samples more than 60 s after its first: (min KiB, max KiB,
        seconds covered) of those samples."""
        flat: dict[tuple[str, int], tuple[int, int, float]] = {}
        for key, samples in self.series.items():
            later = [(t, kb) for t, kb in samples if t >= samples[0][0] + 60.0]
            if len(later) >= 2:
                values = [kb for _, kb in later]
                flat[key] = (min(values), max(values), later[-1][0] - later[0][0])
        return flat


COMMAND_IDS = itertools.count(1)
"""Emulation command ids, rising across the run (a worker refuses one not above the last)."""


async def cut_link(stack: Stack, src: str, dst: str, seconds: float) -> None:
    """Frames src -> dst are held 5 s (later than any pass deadline) for ``seconds``."""
    async with Bus(stack.settings) as bus:
        cut = EmulatedLink(dst=dst, latency_s=5.0)  # type: ignore[arg-type]
        await bus.publish(EMULATION, EmulationCommand(command_id=next(COMMAND_IDS), links=(cut,)), node=src)
        await asyncio.sleep(seconds)
        restore = EmulatedLink(dst=dst, bandwidth_bytes_per_s=50e6, latency_s=0.001)  # type: ignore[arg-type]
        await bus.publish(EMULATION, EmulationCommand(command_id=next(COMMAND_IDS), links=(restore,)), node=src)


SOAK_S_ENV = "EDGESPLIT_SOAK_S"
"""Seconds of faults after the 20 s warm-up (default 600: the acceptance's 10 minutes)."""


@pytest.mark.timeout(1500)
def test_soak_random_faults_every_ten_seconds(own_broker: LocalBroker, tmp_path: Path) -> None:
    """Four clients, one request after another, for EDGESPLIT_SOAK_S (600) seconds; every
    10 s a random fault: SIGKILL of a worker (restarted 2 s later), SIGSTOP (4 s), a cut
    link (frames held 5 s, for 4 s) or a broker restart (SIGKILL or SIGTERM). The VmRSS of
    every process, the broker's included, is sampled every 5 s (numbers in
    docs/RELIABILITY.md)."""
    # Three blocks per node (of six): a plan needs the entry and one more node, so one
    # fault at a time always leaves one. With two blocks per node (a plan needs three of
    # the four), measured 2026-12-06 (600 s, 46 faults): a cut link and a dead node
    # together left no plan 8 times, and 96 requests of 527 ended in NoFeasiblePlan.
    nodes = tuple((name, trust, speed, BLOCKS_3) for name, trust, speed, _ in SPARE)
    stack = stack_for(own_broker, tmp_path, nodes, EDGESPLIT_MAX_IN_FLIGHT="16")
    rng = random.Random(7)
    faults: list[str] = []
    memory = MemoryLog(stack, own_broker)

    async def inject(kind: str) -> None:
        plan = await stack.current_plan()
        victim = rng.choice([s.node for s in plan.segments if s.node != plan.entry_node])
        faults.append(f"{kind}:{victim}" if kind != "broker" else kind)
        if kind == "kill":
            stack.kill(victim)
            await asyncio.sleep(2.0)
            stack.start_worker(victim)
        elif kind == "stop":
            stack.signal(victim, signal.SIGSTOP)
            await asyncio.sleep(4.0)
            stack.signal(victim, signal.SIGCONT)
        elif kind == "broker":
            own_broker.kill(rng.choice([signal.SIGKILL, signal.SIGTERM]))
            assert own_broker.process is not None
            await asyncio.to_thread(own_broker.process.wait, 10)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_broker.start)
        else:
            await cut_link(stack, plan.entry_node, plan.segments[1].node, 4.0)

    async def scenario(duration_s: float) -> Soak:
        soak = Soak(stack, 4)
        streams = [asyncio.create_task(soak.stream(i)) for i in range(soak.streams)]
        await asyncio.sleep(20)  # warm-up
        with memory:
            end = time.monotonic() + duration_s
            while time.monotonic() < end:
                await asyncio.sleep(10)
                await inject(rng.choice(["kill", "stop", "broker", "link"]))
            soak.running = False
            await asyncio.gather(*streams)
        return soak

    try:
        stack.start()
        soak = asyncio.run(scenario(float(os.environ.get(SOAK_S_ENV, "600"))))
    finally:
        stack.stop()
    flat = memory.after_first_minute()
    table = {f"{name}/{pid}": f"{low / 1024:.1f}-{high / 1024:.1f} MiB ({high / low - 1:+.1%}, {span:.0f} s)"
             for (name, pid), (low, high, span) in sorted(flat.items())}  # fmt: skip
    print(f"soak: faults {Counter(f.split(':')[0] for f in faults)} {faults}; outcomes {dict(soak.counts)}")
    print(f"soak: VmRSS after each process's first minute, min-max: {table}")
    long_lived = {f"{name}/{pid}": memory.per_minute((name, pid)) for name, pid in memory.series
                  if len(memory.series[(name, pid)]) * memory.interval_s > 300}  # fmt: skip
    print(f"soak: VmRSS KiB at each minute, processes that lived 5 minutes or more: {long_lived}")
    assert soak.counts["lost"] == soak.counts["duplicated_or_gapped"] == soak.counts["hung"] == 0, soak.counts
    assert soak.counts["wrong"] == 0 and soak.counts["complete"] > 0
    # Typed failures, counted and bounded. A request whose pass was in flight at a kill,
    # SIGSTOP or broker restart may time out at the entry (StageTimedOut), or end as
    # no_plan (NoFeasiblePlan) while the entry itself is seen down (a broker restart can
    # deliver its Last Will); a request started while the broker is away fails at once
    # (BrokerUnavailable, or BusError: its publish not confirmed). Bounds: the first kind
    # at most 1 in 50 requests (at least 2), the broker kind 2 per stream per restart.
    typed = {kind: count for kind, count in soak.counts.items() if kind.startswith("typed:")}
    in_flight_kinds = {"typed:StageTimedOut", "typed:NoFeasiblePlan", "typed:NodeLost"}
    broker_kinds = {"typed:BrokerUnavailable", "typed:BusError"}
    assert set(typed) <= in_flight_kinds | broker_kinds, typed
    assert sum(typed.get(k, 0) for k in in_flight_kinds) <= max(2, soak.counts["complete"] // 50), soak.counts
    restarts = sum(1 for fault in faults if fault == "broker")
    assert sum(typed.get(k, 0) for k in broker_kinds) <= 2 * soak.streams * restarts, (soak.counts, restarts)
    # Every process that lived past its first minute: memory flat within 10 % after it.
    assert flat, "no process lived a minute past the warm-up"
    for (name, pid), (low, high, _) in flat.items():
        assert high <= low * 1.10, (name, pid, low, high)
