"""Two-phase rollouts over a real Mosquitto with real worker processes (a tiny Llama).

Three workers (car, rsu, mec) start on blocks [0,1) [1,3) [3,4) of a 4-block checkpoint
(epoch 1, published directly). The broadcaster runs in-process (and as a subprocess for
the crash test). The tests share the workers and run in file order; each reads the
retained plan it starts from, so a failure of one does not hide the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.broadcaster.service import BroadcasterService, BroadcasterSettings, load_num_layers
from services.cli.client import ClientOptions, current_plan, request
from shared.broker import LocalBroker
from shared.bus import Bus, Subscription
from shared.messages import (
    AbortEpoch,
    CommitEpoch,
    EpochReady,
    EpochRejected,
    GenerateRequest,
    Plan,
    PrepareEpoch,
    RequestFinished,
    RolloutFinished,
    RolloutRequested,
)
from shared.model.pipeline import LocalPipeline
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.topics import EPOCH_ACKS, EPOCH_COMMANDS, ROLLOUT_RESULTS, ROLLOUTS
from tests.integration.cluster import (
    KEY_ENV,
    ROOT,
    TEST_SIGNING_KEY,
    WorkerCluster,
    make_plan,
    publish_plan,
    settings_for,
    started,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
START = (("car", 0, 1), ("rsu", 1, 3), ("mec", 3, 4))
MOVED = (("car", 0, 2), ("rsu", 2, 3), ("mec", 3, 4))
PROMPTS = ([5, 17, 42], [1, 2, 3, 4, 5, 6])
KEY = TEST_SIGNING_KEY  # the control key the helpers give every process


class System:
    def __init__(self, broker: LocalBroker, root: Path) -> None:
        self.model_dir = write_tiny_checkpoint("llama", root / "model", layers=4, seed=3)
        self.shards = root / "shards"
        write_shards(self.model_dir, self.shards)
        self.settings = settings_for(broker.url, "itbroadcast")
        self.broadcaster_settings = BroadcasterSettings(broker_url=broker.url, cluster="itbroadcast",
                                                        shards_dir=self.shards, plan_signing_key=KEY)  # fmt: skip
        # No warm shard cache: the NACK test needs a worker to read a block from disk on PREPARE.
        self.workers = WorkerCluster(broker.url, "itbroadcast", self.shards, root,
                                     extra_env={"EDGESPLIT_WARM_SHARD_BYTES": "0"})  # fmt: skip
        self.root = root
        self.decisions = iter(range(1, 10_000))

    def start(self) -> None:
        for node in ("car", "rsu", "mec"):
            self.workers.start(node, "--max-in-flight", "4")
        rejected = asyncio.run(publish_plan(self.settings, make_plan(1, "car", START, KEY)))
        assert not rejected, {node: self.workers.log_tail(node) for node in rejected}

    def plan(self) -> Plan:
        async def read() -> Plan:
            async with Bus(self.settings) as bus:
                return await current_plan(bus, wait_s=5.0)

        return asyncio.run(read())

    def assert_serves_like_local(self, plan: Plan) -> None:
        """Requests now are token-identical to the in-process split with the plan's cuts."""
        local = LocalPipeline(self.model_dir, tuple(s.end for s in plan.segments[:-1]))
        for prompt in PROMPTS:

            def make(client: str, prompt: list[int] = prompt) -> GenerateRequest:
                return GenerateRequest(request_id=f"b{next(self.decisions)}", reply_to=client,  # type: ignore[arg-type]
                                       token_ids=tuple(prompt), max_new_tokens=12)  # fmt: skip

            result = asyncio.run(request(ClientOptions(self.settings, timeout_s=60.0), make))
            assert isinstance(result, RequestFinished)
            assert result.token_ids == local.generate(prompt, 12).token_ids, prompt


@pytest.fixture(scope="module")
def system(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    yield from started(System(broker, tmp_path_factory.mktemp("broadcast")))


@dataclass
class Seen:
    """What the test saw on the epoch topics and the results topic."""

    results: list[RolloutFinished] = field(default_factory=list)
    commands: list[PrepareEpoch | CommitEpoch | AbortEpoch] = field(default_factory=list)

    def kinds(self, epoch: int) -> list[str]:
        return [c.kind for c in self.commands if c.epoch == epoch]


@contextlib.asynccontextmanager
async def broadcaster(settings: BroadcasterSettings) -> AsyncIterator[BroadcasterService]:
    """An in-process broadcaster, ready (retained state read) on entry, stopped on exit."""
    service = BroadcasterService(settings, load_num_layers(settings.shards_dir))  # type: ignore[arg-type]
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            await service.ready.wait()
        yield service
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def roll_out(bus: Bus, segments: tuple[tuple[str, int, int], ...], decision_id: int,
                   ready_timeout_s: float = 30.0, copies: int = 1) -> tuple[RolloutFinished, Seen]:  # fmt: skip
    """Request a rollout (``copies`` times) and wait for its RolloutFinished."""
    seen = Seen()
    plan = make_plan(0, "car", segments, "unsigned-by-the-requester")
    message = RolloutRequested(decision_id=decision_id, plan=plan, ready_timeout_s=ready_timeout_s,
                               reason="test")  # fmt: skip
    async with bus.subscribe(ROLLOUT_RESULTS) as results, bus.subscribe(EPOCH_COMMANDS) as commands:
        for _ in range(copies):
            await bus.publish(ROLLOUTS, message)
        async with asyncio.timeout(ready_timeout_s + 60):
            while True:
                try:
                    async with asyncio.timeout(0.5):
                        result = (await results.get()).message
                except TimeoutError:
                    continue
                if result.decision_id == decision_id:
                    seen.results.append(result)
                    break
        await asyncio.sleep(0.3)  # what follows the result (nothing, unless a bug) is seen too
        while True:
            try:
                async with asyncio.timeout(0.2):
                    seen.results.append((await results.get()).message)
            except TimeoutError:
                break
        await _drain(commands, seen)
    return seen.results[0], seen


async def _drain(commands: Subscription[Any], seen: Seen) -> list[object]:
    """Move what has arrived on ``commands`` into ``seen`` (waits 50 ms for stragglers)."""
    while True:
        try:
            async with asyncio.timeout(0.05):
                seen.commands.append((await commands.get()).message)
        except TimeoutError:
            return list(seen.commands)


def test_a_boundary_move_commits_and_serves_like_the_local_split(system: System) -> None:
    before = system.plan()

    async def scenario() -> tuple[RolloutFinished, Seen]:
        async with broadcaster(system.broadcaster_settings), Bus(system.settings) as bus:
            return await roll_out(bus, MOVED, next(system.decisions))

    result, seen = asyncio.run(scenario())
    assert result.outcome == "committed", result
    assert result.epoch == before.epoch + 1 and result.previous_epoch == before.epoch
    assert seen.kinds(result.epoch) == ["PrepareEpoch", "CommitEpoch"]
    after = system.plan()
    assert after.epoch == result.epoch and after.signature_ok(KEY)
    assert tuple((s.node, s.start, s.end) for s in after.segments) == MOVED
    system.assert_serves_like_local(after)


def test_a_nack_aborts_and_the_old_epoch_keeps_serving(system: System) -> None:
    before = system.plan()
    nack_plan = (("car", 0, 1), ("mec", 1, 3), ("rsu", 3, 4))  # mec must load block 2 afresh
    block = system.shards / "block-002.safetensors"
    original = block.read_bytes()
    flipped = bytearray(original)
    flipped[-1] ^= 0xFF  # same size, different sha256
    block.write_bytes(bytes(flipped))
    try:

        async def scenario() -> tuple[RolloutFinished, Seen]:
            async with broadcaster(system.broadcaster_settings), Bus(system.settings) as bus:
                return await roll_out(bus, nack_plan, next(system.decisions))

        result, seen = asyncio.run(scenario())
    finally:
        block.write_bytes(original)
    assert result.outcome == "aborted", result
    assert result.epoch > before.epoch and result.previous_epoch == before.epoch
    assert result.reason.startswith("mec rejected") and "sha256" in result.reason, result.reason
    assert seen.kinds(result.epoch) == ["PrepareEpoch", "AbortEpoch"]
    assert system.plan() == before
    system.assert_serves_like_local(before)


def test_a_silent_node_aborts_at_the_deadline(system: System) -> None:
    before = system.plan()

    async def scenario() -> tuple[RolloutFinished, Seen]:
        async with broadcaster(system.broadcaster_settings), Bus(system.settings) as bus:
            system.workers.signal("mec", signal.SIGSTOP)
            try:
                return await roll_out(bus, START, next(system.decisions), ready_timeout_s=2.0)
            finally:
                system.workers.signal("mec", signal.SIGCONT)

    result, seen = asyncio.run(scenario())
    assert result.outcome == "aborted", result
    assert result.reason == "no answer from mec within 2 s" and 2.0 <= result.prepare_s < 3.0
    assert seen.kinds(result.epoch) == ["PrepareEpoch", "AbortEpoch"]
    assert system.plan() == before
    system.assert_serves_like_local(before)


def test_duplicated_requests_and_acks_are_harmless(system: System) -> None:
    before = system.plan()
    target = MOVED if before.segments[0].end == 1 else START
    decision = next(system.decisions)

    async def scenario() -> tuple[RolloutFinished, Seen, Seen]:
        async with broadcaster(system.broadcaster_settings), Bus(system.settings) as bus:
            result, seen = await roll_out(bus, target, decision, copies=3)
            for node in ("car", "rsu", "mec"):  # the acks again, late, and a late NACK
                await bus.publish(EPOCH_ACKS, EpochReady(epoch=result.epoch, node=node), node=node)  # type: ignore[arg-type]
            await bus.publish(EPOCH_ACKS, EpochRejected(epoch=result.epoch, node="mec", reason="late"),  # type: ignore[arg-type]
                              node="mec")  # fmt: skip
            _, after = await roll_out(bus, before_segments(before), next(system.decisions))
            return result, seen, after

    result, seen, after = asyncio.run(scenario())
    assert result.outcome == "committed" and result.previous_epoch == before.epoch
    assert result.epoch > before.epoch  # aborted numbers of earlier tests are burned
    assert [r.decision_id for r in seen.results] == [decision]  # one answer for three requests
    assert [c.kind for c in seen.commands] == ["PrepareEpoch", "CommitEpoch"]
    assert not any(isinstance(c, AbortEpoch) for c in after.commands)
    assert after.results[0].outcome == "committed" and after.results[0].epoch == result.epoch + 1
    system.assert_serves_like_local(system.plan())


def before_segments(plan: Plan) -> tuple[tuple[str, int, int], ...]:
    return tuple((s.node, s.start, s.end) for s in plan.segments)


def test_a_restart_keeps_the_epoch_sequence(system: System) -> None:
    before = system.plan()
    ghost = (("car", 0, 2), ("ghost", 2, 3), ("mec", 3, 4))  # nobody answers for ghost

    async def scenario() -> tuple[RolloutFinished, RolloutFinished]:
        async with Bus(system.settings) as bus:
            async with broadcaster(system.broadcaster_settings):
                aborted, _ = await roll_out(bus, ghost, next(system.decisions), ready_timeout_s=1.0)
            async with broadcaster(system.broadcaster_settings):
                committed, _ = await roll_out(bus, before_segments(before), next(system.decisions))
        return aborted, committed

    aborted, committed = asyncio.run(scenario())
    assert aborted.outcome == "aborted" and aborted.epoch > before.epoch
    assert aborted.reason == "no answer from ghost within 1 s"
    # the retained plan still says before.epoch: only the ledger remembers the burned number
    assert committed.outcome == "committed" and committed.epoch == aborted.epoch + 1
    assert committed.previous_epoch == before.epoch and system.plan().epoch == committed.epoch


def test_a_broadcaster_killed_mid_rollout_is_settled_by_the_next(system: System) -> None:
    before = system.plan()
    ghost = (("car", 0, 2), ("ghost", 2, 3), ("mec", 3, 4))
    logs = [system.root / "broadcaster-1.log", system.root / "broadcaster-2.log"]

    async def scenario() -> tuple[Seen, RolloutFinished]:
        seen = Seen()
        async with Bus(system.settings) as bus, bus.subscribe(EPOCH_COMMANDS) as commands, \
                bus.subscribe(ROLLOUT_RESULTS) as results:  # fmt: skip
            first = _start_broadcaster(system, logs[0])
            try:
                plan = make_plan(0, "car", ghost, "x")
                message = RolloutRequested(decision_id=next(system.decisions), plan=plan,
                                           ready_timeout_s=120.0)  # fmt: skip
                async with asyncio.timeout(30):
                    while not any(
                        isinstance(c, PrepareEpoch) for c in await _drain(commands, seen)
                    ):
                        await bus.publish(
                            ROLLOUTS, message
                        )  # until it listens; copies are harmless
                        await asyncio.sleep(0.5)
            finally:
                first.kill()  # SIGKILL: no clean abort on the way out
                first.wait(timeout=10)
            second = _start_broadcaster(system, logs[1])
            try:
                async with asyncio.timeout(30):
                    result = (await results.get()).message
                    await _drain(commands, seen)
                    while not any(isinstance(c, AbortEpoch) for c in seen.commands):
                        seen.commands.append((await commands.get()).message)
                seen.results.append(result)
                committed, _ = await roll_out(bus, before_segments(before), next(system.decisions))
            finally:
                second.terminate()
                second.wait(timeout=10)
        return seen, committed

    seen, committed = asyncio.run(scenario())
    (epoch,) = [c.epoch for c in seen.commands if isinstance(c, PrepareEpoch)]
    assert epoch > before.epoch
    assert seen.kinds(epoch) == ["PrepareEpoch", "AbortEpoch"], (seen, logs[1].read_text()[-2000:])
    (result,) = seen.results
    assert result.outcome == "aborted" and result.epoch == epoch and "restarted" in result.reason
    assert committed.outcome == "committed" and committed.epoch == epoch + 1
    assert system.plan().epoch == epoch + 1


def _start_broadcaster(system: System, log_file: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **KEY_ENV}
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.broadcaster", "--broker", system.settings.broker_url,
             "--cluster", system.settings.cluster, "--shards", str(system.shards)],
            stdout=log, stderr=log, cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip


def test_a_broadcaster_stopped_mid_rollout_aborts_it_on_the_way_out(system: System) -> None:
    before = system.plan()
    ghost = (("car", 0, 2), ("ghost", 2, 3), ("mec", 3, 4))

    async def scenario() -> tuple[Seen, int | None]:
        seen = Seen()
        async with (
            Bus(system.settings) as bus,
            bus.subscribe(EPOCH_COMMANDS) as commands,
            bus.subscribe(ROLLOUT_RESULTS) as results,
        ):
            process = _start_broadcaster(system, system.root / "broadcaster-3.log")
            try:
                plan = make_plan(0, "car", ghost, "x")
                message = RolloutRequested(decision_id=next(system.decisions), plan=plan,
                                           ready_timeout_s=120.0)  # fmt: skip
                async with asyncio.timeout(30):
                    while not any(
                        isinstance(c, PrepareEpoch) for c in await _drain(commands, seen)
                    ):
                        await bus.publish(ROLLOUTS, message)
                        await asyncio.sleep(0.5)
                    process.terminate()  # SIGTERM: a clean stop
                    seen.results.append((await results.get()).message)
                    while not any(isinstance(c, AbortEpoch) for c in seen.commands):
                        seen.commands.append((await commands.get()).message)
                return seen, await asyncio.to_thread(process.wait, 10)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)

    seen, exit_status = asyncio.run(scenario())
    (epoch,) = [c.epoch for c in seen.commands if isinstance(c, PrepareEpoch)]
    assert seen.kinds(epoch) == ["PrepareEpoch", "AbortEpoch"] and exit_status == 0
    (result,) = seen.results
    assert result.outcome == "aborted" and result.epoch == epoch and "stopped" in result.reason
    assert system.plan() == before
