"""Fault tolerance end to end: the whole stack (monitor, split reviser, broadcaster,
orchestrator, workers) on a real broker; faults are real signals to real processes and
every re-plan is the system's own (docs/ARCHITECTURE.md, "Faults").

Each request must end complete with exactly the tokens of a fault-free run, or with a
typed error before its deadline: never lost, duplicated or hung."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.errors import EdgesplitError, NoAnswer, StageTimedOut
from shared.messages import Plan, RequestFinished
from shared.topics import CAPACITY
from tests.integration.fullstack import Node, Stack, counters

pytestmark = pytest.mark.integration
BLOCKS_2 = 380e3
"""Memory for two blocks of the tiny model (148,920 bytes each) and their caches."""
SPARE = (("car", 2, 0.5, BLOCKS_2), ("rsu", 1, 1.0, BLOCKS_2), ("mec", 0, 1.0, BLOCKS_2),
         ("spare", 1, 1.0, BLOCKS_2))  # fmt: skip
"""Every node holds two blocks: a plan needs three nodes and leaves one spare."""


def stack_for(broker: LocalBroker, tmp_path: Path, nodes: tuple[Node, ...] = SPARE,
              **worker_env: str) -> Stack:  # fmt: skip
    torch.set_num_threads(1)
    cluster = "ft" + tmp_path.name[-8:].replace("_", "")
    return Stack(broker.url, cluster, tmp_path, nodes, "car", worker_env=dict(worker_env))


@pytest.fixture
def stack(broker: LocalBroker, tmp_path: Path) -> Iterator[Stack]:
    site = stack_for(broker, tmp_path)
    try:
        site.start()
        yield site
    finally:
        site.stop()


def middle(plan: Plan) -> str:
    """The node of a segment that is neither the entry's nor the last."""
    inner = [s.node for s in plan.segments[1:-1] if s.node != plan.entry_node]
    assert inner, plan.segments
    return inner[0]


def a_worker(plan: Plan) -> str:
    """The middle node if the plan has one, else the last segment's node: a re-plan
    after a kill may merge the middle away (measured 2026-12-06: 2 runs of 3 re-planned
    to the entry plus one node)."""
    inner = [s.node for s in plan.segments[1:-1] if s.node != plan.entry_node]
    others = [s.node for s in plan.segments if s.node != plan.entry_node]
    assert others, plan.segments
    return inner[0] if inner else others[-1]


async def wait_alive(stack: Stack, node: str, timeout_s: float = 30.0) -> None:
    """Until the monitor's capacity profile (what the reviser plans from) has ``node``
    alive and up again."""
    async with Bus(stack.settings) as bus, bus.subscribe(CAPACITY) as profiles, asyncio.timeout(timeout_s):
        while True:
            _, profile = await profiles.get()
            if any(n.node == node and n.alive and n.health == "up" for n in profile.nodes):
                return


async def wait_linked(stack: Stack, node: str, timeout_s: float = 30.0) -> None:
    """Until the profile has ``node`` alive and its links to and from every other alive
    node measured: a plan can only use a node whose links it knows (a kill 2 s after a
    restart used to leave no feasible plan: the revived node's links were not measured)."""
    async with Bus(stack.settings) as bus, bus.subscribe(CAPACITY) as profiles, asyncio.timeout(timeout_s):
        while True:
            _, profile = await profiles.get()
            alive = {n.node for n in profile.nodes if n.alive and n.health == "up"}
            measured = {(link.src, link.dst) for link in profile.links if link.bandwidth_bytes_per_s > 0}
            if node in alive and all((node, other) in measured and (other, node) in measured
                                     for other in alive - {node}):  # fmt: skip
                return


class Load:
    """Requests decoding while faults happen; records each token's arrival time."""

    def __init__(self, stack: Stack, count: int, tokens: int, timeout_s: float = 60.0, tag: str = "r") -> None:
        self.stack, self.tokens, self.timeout_s = stack, tokens, timeout_s
        self.prompts = [[4 + i % 300, 60 + (3 * i) % 300, 8] for i in range(count)]
        self.arrivals: list[list[tuple[int, float]]] = [[] for _ in range(count)]
        self.tag = tag
        self.tasks: list[asyncio.Task[RequestFinished]] = []
        self.began = time.monotonic()

    def start(self) -> None:
        self.began = time.monotonic()
        self.tasks = [asyncio.create_task(self.stack.generate(f"{self.tag}{i}", p, self.tokens, self.timeout_s,
                                                              self.arrivals[i]))
                      for i, p in enumerate(self.prompts)]  # fmt: skip

    async def until_tokens(self, count: int, timeout_s: float = 30.0) -> None:
        async with asyncio.timeout(timeout_s):
            while min(len(a) for a in self.arrivals) < count:  # noqa: ASYNC110 - polls test state
                await asyncio.sleep(0.01)

    async def results(self) -> tuple[int, int, list[BaseException]]:
        """(complete and identical, wrong, typed errors); asserts none hung or was untyped."""
        outcomes = await asyncio.gather(*self.tasks, return_exceptions=True)
        elapsed = time.monotonic() - self.began
        assert elapsed < self.timeout_s + 5, f"a request outlived its deadline: {elapsed:.1f} s"
        good, wrong, typed = 0, 0, list[BaseException]()
        for prompt, arrivals, outcome in zip(self.prompts, self.arrivals, outcomes, strict=True):
            if isinstance(outcome, EdgesplitError):
                typed.append(outcome)
                continue
            assert not isinstance(outcome, BaseException), repr(outcome)
            expected = self.stack.expected(prompt, self.tokens)
            indices = [index for index, _ in arrivals]
            assert indices == list(range(len(expected))), "streamed tokens duplicated or out of order"
            if outcome.token_ids == expected:
                good += 1
            else:
                wrong += 1
        return good, wrong, typed

    def resumed_after(self, at: float) -> float:
        """Seconds from the fault at ``at`` to the token that ended each request's longest
        stall after it (tokens already in flight arrive at once and do not count), worst
        over the requests."""
        waits = []
        for arrivals in self.arrivals:
            times = [t for _, t in arrivals]
            gaps = [(times[i] - max(times[i - 1], at), times[i]) for i in range(1, len(times)) if times[i] > at]
            if gaps:
                waits.append(max(gaps)[1] - at)
        return max(waits, default=0.0)


def assert_bounded(outcome: tuple[int, int, list[BaseException]], total: int, at_most: int,
                   allowed: tuple[type[BaseException], ...]) -> None:  # fmt: skip
    """Every request complete and token-identical to the unsplit model, except at most
    ``at_most`` that ended in a typed error of an ``allowed`` kind."""
    good, wrong, typed = outcome
    assert wrong == 0, f"{wrong} requests completed with other tokens than the unsplit model's"
    assert good + len(typed) == total, (good, typed)
    assert all(isinstance(error, allowed) for error in typed), (
        f"typed errors of kinds not allowed here ({[a.__name__ for a in allowed]}): {typed}"
    )
    assert len(typed) <= at_most, f"{len(typed)} typed errors, at most {at_most} allowed: {typed}"


async def kill_middle_while_decoding(stack: Stack, requests: int = 4, tokens: int = 60, tag: str = "k",
                                     pick: Callable[[Plan], str] = middle) -> tuple[float, Plan, Plan]:  # fmt: skip
    """Kill -9 the middle node (or ``pick``'s) under load; returns (kill -> next token s,
    old plan, new plan)."""
    before = await stack.current_plan()
    victim = pick(before)
    load = Load(stack, requests, tokens, tag=tag)
    load.start()
    await load.until_tokens(5)
    stack.kill(victim)
    killed = time.monotonic()
    good, wrong, typed = await load.results()
    assert (good, wrong, typed) == (requests, 0, []), (good, wrong, typed)
    after = await stack.wait_served(lambda p: p.epoch > before.epoch, 30)
    assert victim not in {s.node for s in after.segments}
    return load.resumed_after(killed), before, after


def test_kill_middle_worker_then_orchestrator_restart(stack: Stack) -> None:
    resumed_s, before, after = asyncio.run(kill_middle_while_decoding(stack))
    print(f"kill -9 {middle(before)}: next token after {resumed_s:.2f} s; epoch {before.epoch} -> {after.epoch}")
    assert resumed_s < 3.5
    stack.start_worker(middle(before))  # the dead node comes back (fresh): spare capacity again
    # Measured 2026-12-06: killing the second worker before the monitor counted the
    # revived one alive left no feasible plan (2 runs of 3 ended in NoFeasiblePlan).
    asyncio.run(wait_alive(stack, middle(before)))
    # The orchestrator restarts: it reads the retained plan and decisions, starts no new
    # epoch sequence of its own, and the next fault continues the broadcaster's numbering.
    stack.kill("orchestrator")
    stack.start_service("orchestrator")
    deadline = time.monotonic() + 30
    while stack.log("orchestrator").count("orchestrator ready") < 2:
        assert time.monotonic() < deadline, "the restarted orchestrator did not get ready in 30 s"
        time.sleep(0.2)
    assert asyncio.run(stack.current_plan()).epoch == after.epoch
    log = stack.log("orchestrator")
    assert "running nothing" not in log.split("orchestrator ready")[-1]
    # The re-plan may have merged the middle away (measured: 2 of 3 runs planned car +
    # one node), so the second fault kills whichever worker the plan has.
    resumed_s, _, third = asyncio.run(kill_middle_while_decoding(stack, 2, 40, tag="k2-", pick=a_worker))
    assert third.epoch == after.epoch + 1, (after.epoch, third.epoch)


def test_sigstop_for_three_heartbeat_timeouts_then_sigcont(stack: Stack) -> None:
    async def scenario() -> tuple[str, float]:
        before = await stack.current_plan()
        victim = middle(before)
        load = Load(stack, 4, 80)
        load.start()
        await load.until_tokens(5)
        stack.signal(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        good, wrong, typed = await load.results()
        assert (good, wrong, typed) == (4, 0, []), (good, wrong, typed)
        finished = time.monotonic() - stopped
        await asyncio.sleep(max(0.0, 9.0 - finished))  # three heartbeat timeouts (3 s each)
        stack.signal(victim, signal.SIGCONT)
        await asyncio.sleep(4)  # it wakes, drops its stale state and rejoins
        again = Load(stack, 2, 20, tag="after")
        again.start()
        assert await again.results() == (2, 0, [])
        return victim, load.resumed_after(stopped)

    victim, resumed_s = asyncio.run(scenario())
    print(f"SIGSTOP {victim}: requests went on after {resumed_s:.2f} s")
    stack.stop()
    seen = {node: counters(stack.log(node)) for node, *_ in stack.nodes}
    print("counters:", seen)
    assert seen[victim].get("stalls", 0) >= 1, seen[victim]
    rejected = sum(c.get("frames_fenced", 0) + c.get("results_unexpected", 0) for c in seen.values())
    # The victim's stale work is refused where it lands (fenced, unexpected, its KV gone), or
    # never leaves it: the broker closed its session while it was stopped, so the frames it
    # finished on waking fail to publish (frames_unsent; seen in a fresh-clone CI run, where
    # nothing else was counted). Either way the requests above kept the unsplit tokens.
    unsent = seen[victim].get("frames_unsent", 0)
    # Or it is dropped by the victim itself on waking: its KV caches go before it computes
    # anything more (a fresh-clone CI run, 2026-12-07, counted nothing else: "dropped N KV
    # caches" with every other counter at 0).
    dropped = sum(int(n) for n in re.findall(r"dropped (\d+) KV caches", stack.log(victim)))
    assert rejected + seen[victim].get("kv_missing", 0) + unsent + dropped >= 1, (seen, dropped)
    assert "rejoining fresh" in stack.log(victim)


@pytest.mark.parametrize("how", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["sigkill", "sigterm"])  # fmt: skip
def test_broker_restart_during_twenty_requests(own_broker: LocalBroker, tmp_path: Path, how: int) -> None:
    stack = stack_for(own_broker, tmp_path, EDGESPLIT_MAX_IN_FLIGHT="32")

    async def scenario() -> tuple[tuple[int, int, list[BaseException]], float, float]:
        load = Load(stack, 20, 60, timeout_s=60)
        load.start()
        await load.until_tokens(3)
        # A client of the same library, to time its reconnect (the acceptance: within 5 s).
        async with Bus(BusSettings(broker_url=own_broker.url, cluster=stack.cluster)) as client:
            sessions = client.sessions
            own_broker.kill(how)
            assert own_broker.process is not None
            await asyncio.to_thread(own_broker.process.wait, 10)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_broker.start)
            restarted = time.monotonic()
            await client.wait_ready(min_sessions=sessions + 1, timeout_s=10.0)
            reconnect_s = time.monotonic() - restarted
        outcome = await load.results()
        return outcome, reconnect_s, load.resumed_after(restarted)

    try:
        stack.start()
        (good, wrong, typed), reconnect_s, resumed_s = asyncio.run(scenario())
        print(f"broker {signal.Signals(how).name} + restart: {good} complete, {wrong} wrong, "
              f"{len(typed)} typed errors {typed[:3]}; client reconnected {reconnect_s:.2f} s and the "
              f"next token came {resumed_s:.2f} s after the restart")  # fmt: skip
        # Measured 2026-12-06 (SIGKILL, 3 runs: 0, 0, 0 typed errors; SIGTERM, 1 run: 0):
        # requests in flight resubmit after the reconnect. A pass lost with the broker
        # may still time out at the entry, so up to 2 of 20 may end in StageTimedOut
        # (NodeLost, NoPlan) or NoAnswer; nothing else, and the rest identical.
        assert_bounded((good, wrong, typed), 20, at_most=2, allowed=(StageTimedOut, NoAnswer))
        assert reconnect_s < 5.0
        assert resumed_s < 10.0  # requests go on well inside their deadline (60 s)
        plan = asyncio.run(stack.wait_served(lambda p: True, 30))  # converged on the committed plan
        again = Load(stack, 2, 10, tag="after")

        async def after() -> tuple[int, int, list[BaseException]]:
            again.start()
            return await again.results()

        assert asyncio.run(after()) == (2, 0, []), plan
    finally:
        stack.stop()


def test_entry_killed_and_restarted_clients_resume(stack: Stack) -> None:
    """kill -9 the entry while 4 requests decode; it comes back (a supervisor restarts
    it) and each client resubmits with the tokens it holds: one uninterrupted answer."""

    async def scenario() -> float:
        load = Load(stack, 4, 60, tag="e")
        load.start()
        await load.until_tokens(5)
        stack.kill("car")
        killed = time.monotonic()
        stack.start_worker("car")
        good, wrong, typed = await load.results()
        assert (good, wrong, typed) == (4, 0, []), (good, wrong, typed)
        return load.resumed_after(killed)

    resumed_s = asyncio.run(scenario())
    print(f"kill -9 of the entry, restarted: requests went on after {resumed_s:.2f} s")
    assert resumed_s < 20


ENTRY_SPARE = (("car", 2, 0.5, BLOCKS_2), ("car2", 2, 0.5, BLOCKS_2), ("rsu", 1, 1.0, BLOCKS_2),
               ("mec", 0, 1.0, BLOCKS_2))  # fmt: skip
"""Two trusted nodes: when the entry dies the other can take the embedding and head."""


def test_entry_killed_the_orchestrator_names_a_new_entry_and_clients_resubmit(
    broker: LocalBroker, tmp_path: Path
) -> None:
    site = stack_for(broker, tmp_path, ENTRY_SPARE)
    try:
        before = site.start()
        assert before.entry_node == "car"

        async def scenario() -> tuple[float, Plan]:
            load = Load(site, 3, 50, tag="ent")
            load.start()
            await load.until_tokens(5)
            site.kill("car")
            killed = time.monotonic()
            good, wrong, typed = await load.results()
            assert (good, wrong, typed) == (3, 0, []), (good, wrong, typed)
            after = await site.wait_served(lambda p: p.epoch > before.epoch, 30)
            return load.resumed_after(killed), after

        resumed_s, after = asyncio.run(scenario())
    finally:
        site.stop()
    print(f"entry car killed: new entry {after.entry_node}, requests went on after {resumed_s:.2f} s")
    assert after.entry_node == "car2" and "car" not in {s.node for s in after.segments}
    assert "becomes the entry" in site.log("orchestrator")
