"""Acceptance of the adaptive orchestrator under run-time changes, end to end: `edgesplit up`
(four control services, three workers) on a real broker, changes injected with
EmulationCommands on ``nodes/{node}/emulation``, read back from the orchestrator's
DecisionRecorded and the broadcaster's RolloutFinished. Every plan committed on
``plan/current`` is checked against the privacy policy (the first k blocks never on a node
below the trusted level, although the fastest node, mec, is untrusted).

Fast tier (tiny-llama): a bandwidth drop and a 4x load spike while 4 requests decode.
Slow tier: +-10 % measurement noise for 60 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from services.cli.client import ClientOptions, request
from services.orchestrator.logic import classify
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import (
    CapacityProfile,
    DecisionRecorded,
    EmulatedLink,
    EmulationApplied,
    EmulationCommand,
    GenerateRequest,
    LinkCapacity,
    Plan,
    RequestFinished,
    RolloutFinished,
    Segment,
    TokenGenerated,
)  # fmt: skip
from shared.model.pipeline import LocalPipeline
from shared.topics import CAPACITY, DECISIONS, EMULATION, EMULATION_STATE, PLAN, ROLLOUT_RESULTS

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = ROOT / "deploy" / "topologies" / "adaptive-tiny.toml"
TRUST = {"car": 2, "rsu": 1, "mec": 0}  # as in the topology file
PRIVATE_BLOCKS, TRUSTED_LEVEL = 2, 2
DWELL_S = 15.0  # the orchestrator's default dwell
# Link probes: the default budget (2 % of the link, 0.1 s burst) lets a worker probe a link
# that got 10x slower only after a 5 s payback, so the monitor's median (3 of 5 samples)
# moves 8-20 s after the drop. A 0.5 s burst at 5 % keeps probing at 1 round/s.
PROBE_ENV = {"EDGESPLIT_PROBE_BURST_S": "0.5", "EDGESPLIT_PROBE_BUDGET_FRACTION": "0.05"}


def private_ok(plan: Plan) -> bool:
    """No block below PRIVATE_BLOCKS, and not the entry, on a node below the trusted level."""
    entry_ok = TRUST[plan.entry_node] >= TRUSTED_LEVEL
    return entry_ok and all(TRUST[s.node] >= TRUSTED_LEVEL for s in plan.segments if s.start < PRIVATE_BLOCKS)


def layout(segments: tuple[Segment, ...]) -> str:
    return " ".join(f"{s.node}[{s.start},{s.end})" for s in segments)


@dataclass
class Watch:
    """Everything the test reads from the bus: plans, decisions, rollouts, emulation state."""

    plans: list[Plan] = field(default_factory=list)
    decisions: dict[int, DecisionRecorded] = field(default_factory=dict)
    results: list[RolloutFinished] = field(default_factory=list)
    applied: dict[str, EmulationApplied] = field(default_factory=dict)
    link_costs: list[tuple[float, str, str, float]] = field(default_factory=list)
    """(profile time, src, dst, link_cost_s) of every link in every profile seen."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def store(self, message: Any) -> None:
        if isinstance(message, Plan):
            self.plans.append(message)
        elif isinstance(message, DecisionRecorded):
            self.decisions[message.decision_id] = message
        elif isinstance(message, RolloutFinished):
            self.results.append(message)
        elif isinstance(message, EmulationApplied):
            self.applied[message.node] = message
        elif isinstance(message, CapacityProfile):
            self.link_costs += [(message.as_of_s, link.src, link.dst, link_cost_s(link))
                                for link in message.links]  # fmt: skip
        self.changed.set()

    async def follow(self, bus: Bus) -> None:
        async with asyncio.TaskGroup() as group:
            for topic in (PLAN, DECISIONS, ROLLOUT_RESULTS, EMULATION_STATE, CAPACITY):
                group.create_task(self._read(bus, topic))

    async def _read(self, bus: Bus, topic: Any) -> None:
        async with bus.subscribe(topic) as subscription:
            async for _, message in subscription:
                self.store(message)

    async def until(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                while not (found := condition()):
                    self.changed.clear()
                    await self.changed.wait()
                return found
        except TimeoutError:
            summary = [(d.decision_id, d.trigger, d.action, d.outcome, d.reason) for d in self.decisions.values()]
            pytest.fail(f"not within {timeout_s} s: {what}; decisions: {summary}")

    def committed_after(self, at_s: float) -> DecisionRecorded | None:
        """The first change decided after ``at_s`` (Unix s) whose rollout committed."""
        found = [d for d in self.decisions.values()
                 if d.at_s > at_s and d.action != "keep" and d.outcome == "committed"]  # fmt: skip
        return min(found, key=lambda d: d.decision_id, default=None)

    def current(self) -> Plan:
        return max(self.plans, key=lambda p: p.epoch)


@dataclass
class Site:
    """`edgesplit up` on the adaptive topology, tiny-llama; killed in stop()."""

    settings: BusSettings
    process: subprocess.Popen[bytes]
    out: Path
    local: LocalPipeline

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def wait_ready(site: Site, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in site.out.read_text(errors="replace").splitlines():
            if "edgesplit ready" in line:
                return line
        if site.process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no 'edgesplit ready' within {timeout_s} s: {site.out.read_text()[-3000:]}")


@pytest.fixture
def site(broker: LocalBroker, cluster: str, tmp_path: Path) -> Iterator[Site]:
    models = tmp_path / "models"
    env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(models), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", **PROBE_ENV}  # fmt: skip
    out = tmp_path / "up.out"
    with open(out, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--model", "tiny-llama", "--broker", broker.url,
             "--cluster", cluster, "--topology", str(TOPOLOGY), "--run-dir", str(tmp_path / "run")],
            stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    settings = BusSettings(broker_url=broker.url, cluster=cluster,  # type: ignore[arg-type]
                           models_dir=models)  # finds `up`'s key for this broker and cluster  # fmt: skip
    started = Site(settings, process, out, None)  # type: ignore[arg-type]
    try:
        line = wait_ready(started, 120)
        print(line)
        started.local = LocalPipeline(models / "tiny-llama", ())
        yield started
    finally:
        started.stop()


async def generate(settings: BusSettings, index: int, prompt: tuple[int, ...], tokens: int,
                   on_token: Callable[[TokenGenerated], None] | None = None) -> RequestFinished:  # fmt: skip
    def make(client: str) -> GenerateRequest:
        return GenerateRequest(request_id=f"a{index}", reply_to=client, token_ids=prompt,  # type: ignore[arg-type]
                               max_new_tokens=tokens)  # fmt: skip

    # Every request opens its own connection; on the loaded 2-core machine a connect has
    # taken over the default 5 s, which is the test's set-up, not the system under test.
    patient = settings.model_copy(update={"connect_timeout_s": 30.0})
    result = await request(ClientOptions(patient, timeout_s=120), make, on_token)
    assert isinstance(result, RequestFinished)
    return result


def prompts(first: int) -> list[tuple[int, ...]]:
    return [(3 + i, 40 + i, 7, 90 + 2 * i) for i in range(first, first + 4)]


async def batch(site: Site, first: int, tokens: int) -> float:
    """Four concurrent requests to the end; their tokens must equal the local run's.
    Returns their mean time per output token as the client saw it (s): (last token's
    arrival - first token's) / (tokens - 1)."""
    arrivals: dict[int, list[float]] = {i: [] for i in range(4)}

    def stamp(index: int) -> Callable[[TokenGenerated], None]:
        return lambda _token: arrivals[index].append(time.monotonic())

    async with asyncio.timeout(120):
        results = await asyncio.gather(*(generate(site.settings, first + i, p, tokens, stamp(i))
                                         for i, p in enumerate(prompts(first))))  # fmt: skip
    for prompt, result in zip(prompts(first), results, strict=True):
        assert result.token_ids == site.local.generate(list(prompt), tokens).token_ids, prompt
    return mean([(times[-1] - times[0]) / (len(times) - 1) for times in arrivals.values()])


async def during(site: Site, first: int, tokens: int, change: Callable[[], Any]) -> list[RequestFinished]:
    """Four requests; once each streamed 3 tokens, ``await change()``; all must finish with
    the tokens of an undisturbed (local) run: nothing lost, nothing changed."""
    progress: dict[int, int] = {}
    started = asyncio.Event()

    def counter(index: int) -> Callable[[TokenGenerated], None]:
        def on_token(token: TokenGenerated) -> None:
            progress[index] = token.index + 1
            if len(progress) == 4 and min(progress.values()) >= 3:
                started.set()
        return on_token

    async with asyncio.timeout(150), asyncio.TaskGroup() as group:
        tasks = [group.create_task(generate(site.settings, first + i, p, tokens, counter(i)))
                 for i, p in enumerate(prompts(first))]  # fmt: skip
        await started.wait()
        assert max(progress.values()) < tokens, "the requests finished before the change"
        await change()
    results = [task.result() for task in tasks]
    for prompt, result in zip(prompts(first), results, strict=True):
        assert len(result.token_ids) == tokens
        assert result.token_ids == site.local.generate(list(prompt), tokens).token_ids, prompt
    return results


async def emulate(bus: Bus, watch: Watch, node: str, command_id: int, **fields: Any) -> float:
    """Send an EmulationCommand; returns the Unix time it was sent once the node applied it."""
    sent_s = time.time()
    await bus.publish(EMULATION, EmulationCommand(command_id=command_id, **fields), node=node)
    await watch.until(lambda: watch.applied.get(node) and watch.applied[node].command_id == command_id,
                      5, f"{node} applies command {command_id}")  # fmt: skip
    return sent_s


async def settled(watch: Watch) -> tuple[Plan, DecisionRecorded]:
    """The first plan and its decision, once the dwell after it has passed."""
    initial = await watch.until(lambda: watch.plans and watch.committed_after(0.0), 30,
                                "the initial decision committed and its plan seen")  # fmt: skip
    plan = watch.current()
    assert initial.to_epoch == plan.epoch and initial.trigger.startswith("initial"), initial
    first = plan.segments[0]
    assert (first.node, first.start, first.end) == ("car", 0, PRIVATE_BLOCKS), layout(plan.segments)
    assert len(plan.segments) == 2 and plan.segments[1].node in ("mec", "rsu"), layout(plan.segments)
    return plan, initial


def check_privacy(watch: Watch) -> None:
    assert watch.plans
    bad = [layout(p.segments) for p in watch.plans if not private_ok(p)]
    assert not bad, f"plans placing private blocks on untrusted nodes: {bad}"
    for record in watch.decisions.values():  # every feasible candidate of every decision too
        for candidate in record.candidates:
            private = [s for s in candidate.segments if s.start < PRIVATE_BLOCKS]
            if candidate.feasible:
                assert all(TRUST[s.node] >= TRUSTED_LEVEL for s in private), (record.decision_id, candidate)


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


async def observed(site: Site, body: Callable[[Bus, Watch], Any], timeout_s: float) -> Watch:
    watch = Watch()
    async with asyncio.timeout(timeout_s), Bus(site.settings) as bus:
        follower = asyncio.create_task(watch.follow(bus))
        try:
            await body(bus, watch)
        finally:
            follower.cancel()
            with pytest.raises(asyncio.CancelledError):
                await follower
    check_privacy(watch)
    return watch


# --- fast tier ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One request of a load lane, as the client saw it (monotonic s)."""

    started_s: float
    tpot_s: float
    """(last token's arrival - first token's) / (tokens - 1)."""
    prompt: tuple[int, ...]
    result: RequestFinished
    lane: int = 0


async def lane(site: Site, number: int, stop: asyncio.Event, served: list[Served], tokens: int = 48) -> None:
    """Requests one after another until ``stop``. Their tokens are checked against the
    local run afterwards (`check_served`): the local run blocks this process's event loop
    for 0.1-1 s, which would delay the other lanes' token arrivals and inflate the time
    per token they measure."""
    index = 0
    while not stop.is_set():
        index += 1
        prompt = (5 + number, 60 + index % 50, 7)
        arrivals: list[float] = []
        began = time.monotonic()
        def stamp(_token: TokenGenerated, times: list[float] = arrivals) -> None:
            times.append(time.monotonic())

        result = await generate(site.settings, 1000 * (number + 1) + index, prompt, tokens, stamp)
        assert len(result.token_ids) == tokens, prompt
        served.append(Served(began, (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1), prompt, result, number))


def check_served(site: Site, served: list[Served]) -> None:
    """Every lane request finished with the tokens of an undisturbed (local) run."""
    expected: dict[tuple[int, ...], tuple[int, ...]] = {}
    for item in served:
        if item.prompt not in expected:
            expected[item.prompt] = tuple(site.local.generate(list(item.prompt), len(item.result.token_ids)).token_ids)
        assert tuple(item.result.token_ids) == expected[item.prompt], item.prompt


async def steady(watch: Watch, timeout_s: float) -> Plan:
    """The plan in force once DWELL_S + 3 s passed since the last change with no new one:
    a change the load alone calls for has happened by then."""
    async with asyncio.timeout(timeout_s):
        while True:
            last = max((d.at_s for d in watch.decisions.values()
                        if d.action != "keep" and d.outcome == "committed"), default=0.0)  # fmt: skip
            wait_s = last + DWELL_S + 3.0 - time.time()
            if wait_s <= 0:
                return watch.current()
            await asyncio.sleep(wait_s)


@pytest.mark.timeout(300)
def test_bandwidth_drop_replans_within_5_s_and_the_new_plan_meets_its_prediction(site: Site) -> None:
    async def body(bus: Bus, watch: Watch) -> None:
        await settled(watch)
        stop, served = asyncio.Event(), list[Served]()
        async with asyncio.TaskGroup() as lanes, machine_speed() as speed:
            for number in range(4):  # 4 requests decode at every moment from here on
                lanes.create_task(lane(site, number, stop, served))
            try:
                await drop_and_measure(bus, watch, served, speed)
            finally:
                stop.set()
        check_served(site, served)

    async def drop_and_measure(bus: Bus, watch: Watch, served: list[Served], speed: list[tuple[float, float]]) -> None:
        for attempt in range(ATTEMPTS):
            plan = await steady(watch, 60)
            # The cut is the link after the first segment, whatever the load made of the plan.
            assert len(plan.segments) >= 2 and plan.segments[0].node == "car", layout(plan.segments)
            hop = plan.segments[1].node
            before = [r.tpot_s for r in served[-4:]]
            link = next(e for e in watch.applied["car"].links if e.dst == hop)
            assert link.bandwidth_bytes_per_s is not None
            dropped = link.bandwidth_bytes_per_s / 10
            drop_s = await emulate(bus, watch, "car", 2 * attempt + 1, links=(EmulatedLink(
                dst=hop, bandwidth_bytes_per_s=dropped, latency_s=link.latency_s),))  # type: ignore[arg-type]  # fmt: skip
            record = await watch.until(partial(watch.committed_after, drop_s), 30, "a re-plan after the drop")
            committed = time.monotonic()
            replan_s = record.at_s - drop_s
            chosen = record.candidates[record.chosen]  # type: ignore[index]
            # For the record: when the profile first showed the link a third slower for one
            # activation than just before the drop (its estimates move over a few probes).
            last = next((cost for at, src, dst, cost in reversed(watch.link_costs)
                         if at <= drop_s and (src, dst) == ("car", hop)), 0.0)  # fmt: skip
            seen = shown(watch, drop_s, hop, 1.33 * last)
            print(f"plan {layout(plan.segments)}; drop car->{hop} to {dropped / 1e3:.0f} kB/s, link cost up by a "
                  f"third in the profile {seen} s later; decision {record.decision_id} ({record.trigger}: "
                  f"{record.trigger_detail}) {replan_s:.2f} s after "
                  f"the drop: {record.action} to {layout(chosen.segments)}; {record.reason}; predicted "
                  f"{record.current_latency_s * 1e3:.1f} -> {record.predicted_latency_s * 1e3:.1f} ms/token")  # type: ignore[operator]  # fmt: skip
            show(record, drop_s, "bandwidth drop")
            if set(record.trigger.split("+")) <= CAUSED_BY_A_DROP:
                break  # the running plan got worse, or the cut link was flagged: the drop's re-plan
            # A routine re-plan (another link recovered, a node joined: the set-up, not the drop)
            # came first: the premise is gone. Restore the link and cut the new plan's link.
            print(f"attempt {attempt + 1}: the first change after the drop came from {record.trigger}: "
                  f"restoring car->{hop} and trying again")  # fmt: skip
            await emulate(bus, watch, "car", 2 * attempt + 2, links=(link,))
        else:
            pytest.fail(f"every one of {ATTEMPTS} drops was preceded by a routine re-plan")
        assert chosen.segments[1].node != hop, "the new plan must leave the cut link"
        assert replan_s <= 5.0, f"re-planned {replan_s:.2f} s after the drop (goal 5 s)"
        after = await watch.until(partial(steady_after, served, committed, count=MEASURED_REQUESTS), 60,
                                  f"{MEASURED_REQUESTS} requests served by the new plan")  # fmt: skip
        tpot, predicted = mean([r.tpot_s for r in after]), record.predicted_latency_s
        assert predicted is not None
        # The prediction rests on numbers measured before the decision (block times and the
        # calibrated overhead); the machine's own speed, shared with other work, is not the
        # system's to predict. A CPU reference in a separate process measures it.
        drift = speed_ratio(speed, (record.at_s - 10.0, record.at_s), (time.time() - 5.0, time.time()))
        print(f"TPOT before the drop {mean(before) * 1e3:.1f} ms; after the re-plan {tpot * 1e3:.1f} ms "
              f"({len(after)} requests; {mean([r.result.tpot_s for r in after]) * 1e3:.1f} ms at the entry) "
              f"vs predicted {predicted * 1e3:.1f} ms ({tpot / predicted - 1:+.1%}); "
              f"CPU reference after / before the decision: {drift:.2f}")  # fmt: skip
        later = [d for d in watch.decisions.values() if d.decision_id > record.decision_id and d.current_latency_s]
        print("the running plan re-predicted later (ms/token, overhead included): "
              + ", ".join(f"{d.current_latency_s * 1e3:.1f} ({d.trigger})" for d in later if d.current_latency_s))  # fmt: skip
        miss = f"TPOT {tpot * 1e3:.1f} ms vs predicted {predicted * 1e3:.1f} ms ({tpot / predicted - 1:+.1%})"
        if abs(tpot / predicted - 1) > 0.2 and abs(drift - 1) > MAX_SPEED_DRIFT:
            unmeasurable.append(f"{miss}, but the machine's speed changed by {drift - 1:+.0%} between the "
                                f"decision and the measurement")  # fmt: skip
            return
        assert abs(tpot / predicted - 1) <= 0.2, miss

    unmeasurable: list[str] = []
    asyncio.run(observed(site, body, 260))
    if unmeasurable:  # outside the task groups: an xfail raised inside one becomes a failure
        pytest.xfail(unmeasurable[0])


CAUSED_BY_A_DROP = {"plan_degraded", "link_degraded", "follow_up", "periodic"}
"""Triggers of a re-plan the drop can cause (a periodic one re-evaluates the same profile)."""
ATTEMPTS = 2
"""Drops tried when a routine re-plan (not caused by the drop) beats the drop's."""
MAX_SPEED_DRIFT = 0.15
"""Beyond this change of the CPU reference the TPOT goal is not measurable (xfail)."""
REFERENCE = ("import time\n"
             "while True:\n"
             "    began = time.perf_counter()\n"
             "    sum(i * i for i in range(20000))\n"
             "    print(time.time(), time.perf_counter() - began, flush=True)\n"
             "    time.sleep(0.25)\n")  # fmt: skip
"""A fixed pure-Python loop (a few ms, like the per-hop work) timed 4 times a second."""


@contextlib.asynccontextmanager
async def machine_speed() -> Any:
    """Samples (Unix s, seconds of the fixed loop) from a separate process while open."""
    samples: list[tuple[float, float]] = []
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", REFERENCE,
                                                   stdout=asyncio.subprocess.PIPE)  # fmt: skip

    async def read() -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            at_s, took_s = map(float, line.split())
            samples.append((at_s, took_s))

    reader = asyncio.create_task(read())
    try:
        yield samples
    finally:
        process.kill()
        await process.wait()
        await reader


def speed_ratio(samples: list[tuple[float, float]], before: tuple[float, float],
                after: tuple[float, float]) -> float:  # fmt: skip
    """Median reference time in ``after`` over that in ``before`` (Unix s windows); 1 without samples."""
    def median(window: tuple[float, float]) -> float | None:
        inside = sorted(took for at, took in samples if window[0] <= at <= window[1])
        return inside[len(inside) // 2] if inside else None

    first, last = median(before), median(after)
    return last / first if first and last else 1.0


def net_s(candidate: Any) -> float:
    """A candidate's gain over the horizon minus its cost (migration + the default 0.2 s switch)."""
    return candidate.predicted_gain_s - (candidate.migration_cost_s + SWITCH_OVERHEAD_S)


SWITCH_OVERHEAD_S = 0.2  # the orchestrator's default switch_overhead_s


MEASURED_REQUESTS = 24
"""Requests the new plan's time per token is measured over (about 4 s of the 4 lanes): over
8 (2 s) the mean moved with the slow and fast spells of this shared machine by as much as
the prediction's 20 % tolerance."""


def steady_after(served: list[Served], committed_s: float, lanes: int = 4, count: int = 8) -> list[Served] | None:
    """``count`` requests that started once every request in flight at ``committed_s``
    (monotonic) had finished: the new plan's steady state, not the switch. A lane starts
    its next request when the last one finished, so the switch is over when every lane
    started one after the commit."""
    firsts = [min((r.started_s for r in served if r.lane == lane and r.started_s > committed_s), default=None)
              for lane in range(lanes)]  # fmt: skip
    if any(first is None for first in firsts):
        return None
    over_s = max(first for first in firsts if first is not None)
    steady = [r for r in served if r.started_s >= over_s]
    return steady if len(steady) >= count else None


ACTIVATION_BYTES = 256
"""One token's hidden state of tiny-llama (64 x fp32)."""


def link_cost_s(link: LinkCapacity) -> float:
    """Seconds one activation takes over ``link`` as the profile has it (inf: unmeasured)."""
    if link.bandwidth_bytes_per_s <= 0:
        return math.inf
    return link.latency_s + ACTIVATION_BYTES / link.bandwidth_bytes_per_s


def shown(watch: Watch, drop_s: float, hop: str, above_s: float) -> float | None:
    """Seconds after ``drop_s`` of the first profile with car->``hop`` costing more than
    ``above_s`` per activation."""
    return next((at - drop_s for at, src, dst, cost in watch.link_costs
                 if at > drop_s and (src, dst) == ("car", hop) and cost > above_s), None)  # fmt: skip


def show(record: DecisionRecorded, since_s: float, what: str) -> None:
    print(f"{what}; decision {record.decision_id} ({record.trigger}) {record.at_s - since_s:.2f} s later: "
          f"{record.action}: {record.reason}")  # fmt: skip
    for candidate in record.candidates:
        print(f"  {candidate.kind:8} {candidate.summary:32} {candidate.predicted_latency_s * 1e3:6.2f} ms/token "
              f"cost {candidate.migration_cost_s:.3f} s gain {candidate.predicted_gain_s:.3f} s: {candidate.note}")  # fmt: skip


def assert_keep_follows_the_cost_model(record: DecisionRecorded, running: tuple[Segment, ...]) -> None:
    """A keep, recomputed from the record's own numbers: every feasible alternative saves
    less than the threshold (15 %: only the first plan was made, so no hysteresis) of the
    running plan's predicted time per token (overhead included), or its gain over the
    horizon does not beat its migration cost plus the switch overhead."""
    assert record.action == "keep" and not record.emergency, record.reason
    current = record.candidates[0]
    assert current.kind == "current" and current.segments == running and record.current_latency_s is not None
    overhead_s = record.current_latency_s - current.predicted_latency_s
    assert overhead_s >= -1e-9
    for candidate in record.candidates[1:]:
        if not candidate.feasible:
            continue
        saving = (current.predicted_latency_s - candidate.predicted_latency_s) / record.current_latency_s
        assert saving < 0.15 + 1e-9 or net_s(candidate) <= 1e-9, (record.decision_id, candidate)


def blocks_on(segments: tuple[Segment, ...], node: str) -> int:
    return sum(s.end - s.start for s in segments if s.node == node)


@pytest.mark.timeout(240)
def test_a_4x_load_spike_moves_work_off_the_node_as_the_cost_model_says(site: Site) -> None:
    async def body(bus: Bus, watch: Watch) -> None:
        plan, initial = await settled(watch)
        await batch(site, 0, 32)
        await asyncio.sleep(max(0.0, initial.at_s + DWELL_S + 0.5 - time.time()))
        spike_s, slow, base = 0.0, "", 1.0

        async def spike() -> None:
            # The plan in force when the spike comes is what it must move off: the load
            # itself may have moved the work since the first plan (the cost model prices the
            # requests in flight as batched steps; seen in a fresh-clone CI run).
            nonlocal spike_s, slow, base, plan
            plan = watch.current()
            slow = plan.segments[1].node
            base = watch.applied[slow].slowdown if slow in watch.applied else 1.0
            spike_s = await emulate(bus, watch, slow, 1, slowdown=base * 4)

        await during(site, 10, 120, spike)
        # Whether moving pays depends on measured numbers (how much of the time per token is
        # the slowed node's compute): the orchestrator must act as the cost model says.
        # Either a change commits, or every decision after the spike is a keep whose
        # recorded numbers show no alternative passes the rule.
        with contextlib.suppress(pytest.fail.Exception):
            await watch.until(lambda: watch.committed_after(spike_s), 40, "a change after the load spike")

        def changes() -> list[DecisionRecorded]:
            return [d for d in watch.decisions.values() if d.at_s > spike_s and d.action != "keep"]

        # A change decided late in the 40 s may still be rolling out (loaded machine): its outcome.
        await watch.until(lambda: all(d.outcome in ("committed", "aborted", "failed") for d in changes()),
                          30, "the rollout of every change after the spike ends")  # fmt: skip
        record = watch.committed_after(spike_s)
        if record is None:
            assert not changes(), [(d.decision_id, d.action, d.outcome, d.outcome_detail) for d in changes()]
            kept = [d for d in watch.decisions.values() if d.at_s > spike_s and d.candidates]
            assert kept, "no decision was recorded after the spike (the running plan's prediction must rise)"
            for decision in kept:
                show(decision, spike_s, f"slowdown {base:g} -> {base * 4:g} on {slow}")
                assert_keep_follows_the_cost_model(decision, plan.segments)
            return
        show(record, spike_s, f"slowdown {base:g} -> {base * 4:g} on {slow}")
        running, chosen = record.candidates[0], record.candidates[record.chosen]  # type: ignore[index]
        assert running.kind == "current" and running.segments == plan.segments and not record.emergency
        assert record.action == classify(running.segments, chosen.segments)
        assert blocks_on(chosen.segments, slow) < blocks_on(running.segments, slow)
        # The winner is the eligible candidate with the largest net gain, and it saves at
        # least the threshold (15 %) of the running plan's predicted time per token.
        eligible = [c for c in record.candidates[1:] if c.feasible and ", net " in c.note]
        assert chosen in eligible and all(net_s(chosen) >= net_s(c) - 1e-9 for c in eligible)
        assert record.current_latency_s is not None and record.predicted_latency_s is not None
        saving = (record.current_latency_s - record.predicted_latency_s) / record.current_latency_s
        assert saving >= 0.15 - 1e-9 and net_s(chosen) > 0
        # The decision record and the broadcaster's plan come from two publishers: either may arrive first.
        await watch.until(lambda: watch.current().epoch == record.to_epoch, 10, f"plan epoch {record.to_epoch}")
        assert watch.current().segments == chosen.segments

    asyncio.run(observed(site, body, 200))


# --- slow tier ----------------------------------------------------------------------------


async def keep_busy(site: Site, lane: int, stop: asyncio.Event, served: list[RequestFinished]) -> None:
    index = 0
    while not stop.is_set():
        index += 1
        prompt = (5 + lane, 60 + index % 50, 7)
        result = await generate(site.settings, 1000 * (lane + 1) + index, prompt, 24)
        assert result.token_ids == site.local.generate(list(prompt), 24).token_ids
        served.append(result)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ten_percent_noise_replans_at_most_once_a_minute(site: Site) -> None:
    async def body(bus: Bus, watch: Watch) -> None:
        _, initial = await settled(watch)
        for command_id, node in enumerate(TRUST, 1):
            await emulate(bus, watch, node, command_id, noise=0.1)
        await asyncio.sleep(max(0.0, initial.at_s + DWELL_S + 0.5 - time.time()))
        began = time.time()
        stop, served = asyncio.Event(), list[RequestFinished]()
        async with asyncio.TaskGroup() as group:
            for lane in range(2):
                group.create_task(keep_busy(site, lane, stop, served))
            await asyncio.sleep(60)
            stop.set()
        replans = [d for d in watch.decisions.values()
                   if d.at_s >= began and d.action != "keep" and d.outcome == "committed"]  # fmt: skip
        evaluated = [d for d in watch.decisions.values() if d.at_s >= began]
        print(f"60 s of +-10 % noise, {len(served)} requests served: {len(evaluated)} decisions recorded, "
              f"re-plans: {[(d.decision_id, d.trigger, d.action, d.reason) for d in replans]}")  # fmt: skip
        assert len(replans) <= 1
        assert len(served) >= 4

    asyncio.run(observed(site, body, 280))
