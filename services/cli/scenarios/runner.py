"""`edgesplit scenario run`: each policy on a fresh stack with the same seeded workload
and the same timed events; then the report (docs/SCENARIOS.md).

Ctrl-C (or SIGTERM) stops the policy running now cleanly (its requests in flight get a
few seconds), skips the policies not yet run, and still writes what was measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.cli.client import Client, ClientOptions
from services.cli.launcher import ensure_shards, resolve_model
from services.cli.scenarios import analysis
from services.cli.scenarios.events import EventDriver
from services.cli.scenarios.first_plan import declared_first_plan, format_layout
from services.cli.scenarios.observe import Observer, wait_until_served
from services.cli.scenarios.records import PolicyRun
from services.cli.scenarios.reference import references
from services.cli.scenarios.spec import Scenario
from services.cli.scenarios.stack import ScenarioStack
from services.cli.scenarios.workload import WorkloadDriver
from shared.bus import Bus
from shared.config import BusSettings, load_settings
from shared.messages import PrivacyPolicySet
from shared.model.shard import ShardStore
from shared.model.shard_files import ShardFiles
from shared.topics import POLICY
from shared.topology import Topology, load_topology

REQUEST_TIMEOUT_S = 60.0
"""A request without a terminal answer this long after it was sent is lost."""
ENTRY_DOWN_WAIT_S = 20.0
"""A request whose entry is down with no plan after it for this long is recorded failed
(NoFeasiblePlan, ``no_plan``): the client saw the entry's NodeDown and no plan came."""
FIRST_PLAN_TIMEOUT_S = 600.0
INTERRUPTED_DRAIN_S = 5.0
PROGRESS_EVERY_S = 5.0


def say(line: str) -> None:
    print(f"edgesplit: {line}", file=sys.stderr, flush=True)


class Prepared:
    """What every policy shares: the topology, the model's shards and the references."""

    def __init__(self, scenario: Scenario, progress: Callable[[str], None]) -> None:
        self.scenario = scenario
        self.topology: Topology = load_topology(scenario.topology)
        settings = load_settings(BusSettings, {})
        self.model_dir = resolve_model(scenario.model, settings.models_dir)
        self.shards = ensure_shards(self.model_dir, settings.models_dir / f"{self.model_dir.name}-shards")
        files = ShardFiles(self.shards)
        self.num_layers = files.config.num_layers
        self.block_bytes = [block.bytes for block in files.manifest.blocks]
        first = [n.id for n in self.topology.nodes
                 if not any(e.kind == "join" and e.node == n.id for e in scenario.events)]  # fmt: skip
        self.first_plan = format_layout(declared_first_plan(self.topology, ShardStore(self.shards), first))
        progress(f"first plan for every policy (the planner's best for the declared topology): "
                 f"{self.first_plan}")
        progress(f"computing the unsplit reference answers for {scenario.name} in-process")
        self.references = references(self.model_dir, scenario.workload, progress)


class PolicyRunner:
    """One policy: start its stack, run the workload and events, stop, and measure."""

    def __init__(self, prepared: Prepared, policy: str, out_dir: Path, progress: Callable[[str], None]) -> None:
        self.prepared = prepared
        self.scenario = prepared.scenario
        self.policy = policy
        self.progress = progress
        late = frozenset(e.node for e in self.scenario.events if e.kind == "join" and e.node)
        self.stack = ScenarioStack(policy, prepared.topology, self.scenario.topology, prepared.shards,
                                   out_dir / "logs" / policy, late, prepared.first_plan)  # fmt: skip

    async def run(self, interrupt: asyncio.Event) -> PolicyRun | None:
        """The measured run, or None when interrupted before its first plan was served."""
        stack = self.stack
        try:
            await asyncio.to_thread(stack.start_broker)
            await asyncio.to_thread(stack.start_workers)
            await asyncio.to_thread(stack.start_control)
            async with Bus(stack.settings) as bus:
                await bus.publish(POLICY, PrivacyPolicySet(policy=self.prepared.topology.privacy_policy(),
                                                           set_at_s=time.time(), reason="scenario start"))  # fmt: skip
                self.progress(f"[{self.policy}] stack up on {stack.settings.broker_url}; waiting for the first plan")
                served = asyncio.create_task(wait_until_served(bus, FIRST_PLAN_TIMEOUT_S, stack.dead))
                stopped = asyncio.create_task(interrupt.wait())
                await asyncio.wait({served, stopped}, return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                if not served.done():
                    served.cancel()
                    return None
                plan = served.result()
                self.progress(f"[{self.policy}] serving epoch {plan.epoch}: "
                              + " ".join(f"{s.node}[{s.start},{s.end})" for s in plan.segments))  # fmt: skip
                return await self._measure(bus, interrupt)
        finally:
            await asyncio.to_thread(stack.stop)

    async def _measure(self, bus: Bus, interrupt: asyncio.Event) -> PolicyRun:
        scenario, loop = self.scenario, asyncio.get_running_loop()
        t0, t0_unix = loop.time(), time.time()

        def clock() -> float:
            return loop.time() - t0

        observer = Observer(clock)
        options = ClientOptions(self.stack.settings, timeout_s=REQUEST_TIMEOUT_S,
                                entry_down_wait_s=ENTRY_DOWN_WAIT_S)  # fmt: skip
        async with Client(options=options) as client, asyncio.TaskGroup() as group:
            driver = WorkloadDriver(client, scenario.workload, scenario.duration_s, scenario.seed, clock,
                                    REQUEST_TIMEOUT_S, self.prepared.references)  # fmt: skip
            events = EventDriver(self.stack, bus, scenario.events, clock)
            background = [group.create_task(observer.run(bus), name="observe"),
                          group.create_task(events.run(), name="events"),
                          group.create_task(self._report_progress(clock, driver, observer), name="progress")]  # fmt: skip
            sending = group.create_task(driver.run(interrupt), name="workload")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(scenario.duration_s):
                    await interrupt.wait()
            interrupted = interrupt.is_set()
            ended_s = clock()
            await sending
            await driver.drain(INTERRUPTED_DRAIN_S if interrupted else REQUEST_TIMEOUT_S)
            for task in background:
                task.cancel()
        requests = tuple(driver.records)
        last = max((r.finished_at_s or 0.0 for r in requests), default=0.0)
        end_s = max(ended_s, last)
        replans = analysis.replans(observer.decisions, events.changes, observer.plans, requests,
                                   self.prepared.block_bytes, t0_unix)  # fmt: skip
        violations = analysis.privacy_violations(observer.plans, events.policies, self.prepared.topology,
                                                 self.prepared.num_layers, requests, end_s)  # fmt: skip
        notes = (f"interrupted at {ended_s:.1f} s of {scenario.duration_s:g} s",) if interrupted else ()
        return PolicyRun(
            policy=self.policy, duration_s=round(end_s, 3),
            nodes=tuple(node.id for node in self.prepared.topology.nodes),
            requests=requests, replans=tuple(replans), events=tuple(events.applied),
            placements=tuple(observer.placements), utilisation=tuple(observer.utilisation),
            privacy_violations=violations, interrupted=interrupted, notes=notes,
        )  # fmt: skip

    async def _report_progress(self, clock: Callable[[], float], driver: WorkloadDriver,
                               observer: Observer) -> None:  # fmt: skip
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            committed = sum(1 for d in observer.decisions.values() if d.committed_at_s is not None)
            self.progress(f"[{self.policy}] {min(clock(), self.scenario.duration_s):.0f}/"
                          f"{self.scenario.duration_s:g} s: {driver.done()} of {driver.sent} requests done "
                          f"({driver.failed()} failed or lost), {len(driver.open)} in flight, "
                          f"{committed} re-plan{'' if committed == 1 else 's'}")  # fmt: skip


async def run_scenario(scenario: Scenario, policies: tuple[str, ...], out_dir: Path, command: str,
                       progress: Callable[[str], None] = say) -> tuple[Path, list[PolicyRun]]:  # fmt: skip
    """Run ``policies`` one after the other and write the report; returns report.md's path."""
    from services.cli.scenarios.report import write_report

    interrupt = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, _on_signal(interrupt, progress))
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    prepared = await asyncio.to_thread(Prepared, scenario, progress)
    runs: list[PolicyRun] = []
    for policy in policies:
        if interrupt.is_set():
            progress(f"[{policy}] skipped: interrupted")
            continue
        progress(f"[{policy}] starting a fresh stack ({scenario.duration_s:g} s of {scenario.workload.kind} load)")
        run = await PolicyRunner(prepared, policy, out_dir, progress).run(interrupt)
        if run is not None:
            runs.append(run)
            progress(f"[{policy}] done: {sum(r.outcome == 'completed' for r in run.requests)} of "
                     f"{len(run.requests)} requests completed, {len(run.replans)} re-plans")  # fmt: skip
    report = await asyncio.to_thread(write_report, out_dir, scenario, runs, command)
    return report, runs


def _on_signal(interrupt: asyncio.Event, progress: Callable[[str], None]) -> Callable[[], None]:
    def handle() -> None:
        if not interrupt.is_set():
            progress("interrupted: stopping the stack and writing what was measured")
        interrupt.set()

    return handle


def policies_from(text: str) -> tuple[str, ...]:
    """``all`` (static,migrate,adaptive) or a comma-separated subset of
    static,migrate,adaptive,compressed (in that order)."""
    from services.cli.scenarios.spec import NAMED_POLICIES, POLICIES, ScenarioError

    if text.strip() == "all":
        return POLICIES
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [p for p in chosen if p not in NAMED_POLICIES]
    if unknown or not chosen:
        raise ScenarioError(f"--policy: unknown policy {unknown[0] if unknown else text!r} "
                            f"(use all or a comma-separated subset of {','.join(NAMED_POLICIES)})")  # fmt: skip
    return tuple(p for p in NAMED_POLICIES if p in chosen)


def summary(runs: list[PolicyRun]) -> list[str]:
    """One line per policy for the terminal."""
    lines: list[str] = []
    for run in runs:
        done = [r for r in run.requests if r.outcome == "completed"]
        tpots = sorted(t for r in done if (t := r.tpot_s) is not None)
        p95 = f"{tpots[min(len(tpots) - 1, int(0.95 * len(tpots)))] * 1e3:.0f} ms" if tpots else "-"
        lines.append(f"{run.policy:>8}: {len(done)}/{len(run.requests)} completed, p95 tpot {p95}, "
                     f"{len(run.replans)} re-plans, {run.privacy_violations} privacy violations")  # fmt: skip
    return lines


def describe_args(argv: list[str] | Any) -> str:
    return "edgesplit " + " ".join(str(a) for a in argv)
