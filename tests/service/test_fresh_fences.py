"""The freshness bound on a real Mosquitto (docs/SECURITY.md, "Freshness"): a receiver
restarted after an event has no memory to fence a replay of it with, and refuses the
replayed bytes by their signed issue time (``{Kind}_stale``); a fresh genuine message
still passes; and an orchestrator restarted without its retained records starts its
decision ids above every earlier one, so a receiver that lived through it accepts its
records. ``max_message_age_s`` is short here (AGE_S) so the test need not wait 30 s.

The replays need no key: the attacker republishes the bytes it read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from services.orchestrator.service import OrchestratorService
from services.orchestrator.settings import OrchestratorSettings
from services.worker.compute import Slowdown
from services.worker.emulation import Emulation
from services.worker.shaper import EgressSchedule
from shared import codec
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import DecisionRecorded, EmulationCommand
from shared.security.signing import ControlGate, receiver_fences
from shared.topics import DECISION_SLOTS, DECISIONS, EMULATION, EMULATION_STATE, PLAN, POLICY

pytestmark = pytest.mark.timeout(90)
KEY = "service-test-key-0123456789"
AGE_S = 1.5


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls state the code under test keeps
            await asyncio.sleep(0.02)


def test_a_restarted_worker_refuses_a_replayed_emulation_command_as_stale(broker: LocalBroker,
                                                                         cluster: str) -> None:  # fmt: skip
    """The worker's own emulation follower (services/worker/emulation.py) applies the
    operator's command 1; the worker restarts (command ids start again at 0); the
    recorded command 1, replayed once it is older than the bound, is refused although its
    id is above the restarted worker's; the operator's next genuine command is applied."""
    settings = BusSettings(broker_url=broker.url, cluster=cluster, plan_signing_key=KEY,  # type: ignore[arg-type]
                           max_message_age_s=AGE_S)  # fmt: skip
    commands, states = EMULATION.topic(cluster, node="car"), EMULATION_STATE.topic(cluster, node="car")

    def worker() -> Emulation:
        emulation = Emulation("car", Slowdown(1.0), EgressSchedule())
        emulation.gate = ControlGate(KEY, "car", max_age_s=AGE_S)
        return emulation

    async def main() -> tuple[Emulation, EmulationCommand]:
        captured: list[tuple[str, bytes]] = []
        async with (Bus(settings) as operator, aiomqtt.Client("127.0.0.1", broker.port) as attacker,
                    asyncio.TaskGroup() as group):  # fmt: skip
            await attacker.subscribe(commands, qos=1)
            await attacker.subscribe(states, qos=1)

            async def record() -> None:
                async for message in attacker.messages:
                    captured.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]

            recorder = group.create_task(record())

            def states_of(command_id: int) -> int:
                applied = [getattr(codec.decode(payload).message, "command_id", None)
                           for topic, payload in captured if topic == states]  # fmt: skip
                return applied.count(command_id)

            first = worker()
            async with Bus(settings) as worker_bus:
                running = group.create_task(first.run(worker_bus))
                await until(lambda: states_of(0) >= 1)  # subscribed: it published its state
                await operator.publish(EMULATION, EmulationCommand(command_id=1, slowdown=3.0), node="car")
                await until(lambda: first.command_id == 1 and states_of(1) >= 1)
                running.cancel()
            recorded = next(payload for topic, payload in captured if topic == commands)
            replayed: EmulationCommand = codec.decode(recorded).message  # type: ignore[assignment]
            await asyncio.sleep(max(0.0, replayed.issued_at_s + AGE_S + 0.3 - time.time()))
            restarted = worker()
            async with Bus(settings) as worker_bus:
                running = group.create_task(restarted.run(worker_bus))
                await until(lambda: states_of(0) >= 2)  # the restarted worker's state
                await attacker.publish(commands, recorded, qos=1)
                await until(lambda: sum(restarted.gate.refusals().values()) >= 1)  # type: ignore[union-attr]
                await operator.publish(EMULATION, EmulationCommand(command_id=1, slowdown=2.0), node="car")
                await until(lambda: restarted.command_id == 1)
                running.cancel()
            recorder.cancel()
        return restarted, replayed

    restarted, replayed = asyncio.run(asyncio.wait_for(main(), 60))
    assert restarted.gate is not None and restarted.gate.refusals() == {"EmulationCommand_stale": 1}
    assert restarted.state().slowdown == 2.0  # the genuine command, never the replayed 3.0
    assert replayed.slowdown == 3.0 and replayed.command_id == 1  # its id alone would have passed a fresh worker


def test_a_restarted_worker_with_a_replay_memory_refuses_a_replay_within_the_bound(
        broker: LocalBroker, cluster: str, tmp_path: Path) -> None:  # fmt: skip
    """As above, but the replay comes at once, well within the bound (the window the
    bound leaves open), and the worker's gate keeps a replay memory file (as under
    `edgesplit up`): the restarted worker refuses the recorded command 1 as
    ``EmulationCommand_replayed`` and applies the operator's next genuine command."""
    age_s = 30.0  # the deployed bound: the replay is well inside it
    settings = BusSettings(broker_url=broker.url, cluster=cluster, plan_signing_key=KEY,  # type: ignore[arg-type]
                           max_message_age_s=age_s, replay_memory_dir=tmp_path)  # fmt: skip
    commands = EMULATION.topic(cluster, node="car")

    def worker() -> Emulation:
        emulation = Emulation("car", Slowdown(1.0), EgressSchedule())
        emulation.gate = receiver_fences(ControlGate(KEY, "car", max_age_s=age_s), settings)
        return emulation

    async def main() -> Emulation:
        captured: list[bytes] = []
        async with (Bus(settings) as operator, aiomqtt.Client("127.0.0.1", broker.port) as attacker,
                    asyncio.TaskGroup() as group):  # fmt: skip
            await attacker.subscribe(commands, qos=1)

            async def record() -> None:
                async for message in attacker.messages:
                    captured.append(bytes(message.payload))  # type: ignore[arg-type]

            recorder = group.create_task(record())
            first = worker()
            async with Bus(settings) as worker_bus:
                running = group.create_task(first.run(worker_bus))
                await asyncio.sleep(0.5)  # subscribed
                await operator.publish(EMULATION, EmulationCommand(command_id=1, slowdown=3.0), node="car")
                await until(lambda: first.command_id == 1 and len(captured) == 1)
                running.cancel()
            restarted = worker()
            async with Bus(settings) as worker_bus:
                running = group.create_task(restarted.run(worker_bus))
                await asyncio.sleep(0.5)
                await attacker.publish(commands, captured[0], qos=1)  # a second or two after its issue
                await until(lambda: sum(restarted.gate.refusals().values()) >= 1)  # type: ignore[union-attr]
                await operator.publish(EMULATION, EmulationCommand(command_id=1, slowdown=2.0), node="car")
                await until(lambda: restarted.command_id == 1)
                running.cancel()
            recorder.cancel()
        return restarted

    restarted = asyncio.run(asyncio.wait_for(main(), 60))
    assert restarted.gate is not None and restarted.gate.refusals() == {"EmulationCommand_replayed": 1}
    assert restarted.state().slowdown == 2.0  # the genuine command, never the replayed 3.0


class Receiver:
    """Fences decision records as a worker does (`ControlGate.current` with the
    delivery's retained flag, services/worker/health.py) and keeps what it accepted."""

    def __init__(self, name: str) -> None:
        self.gate = ControlGate(KEY, name, max_age_s=AGE_S)
        self.accepted: list[tuple[int, int]] = []
        self.subscribed = asyncio.Event()

    async def run(self, bus: Bus) -> None:
        async with bus.subscribe(DECISIONS) as decisions:
            self.subscribed.set()
            async for delivery in decisions:
                record = delivery.message
                if self.gate.signed(record) and self.gate.current(record, delivery.retained):
                    self.accepted.append((record.decision_id, record.revision))

    def handled(self) -> int:
        return len(self.accepted) + sum(self.gate.refusals().values())


async def restore(orchestrator: OrchestratorService, bus: Bus) -> None:
    """The orchestrator's start: its retained plan, policy and decisions (`_restore`)."""
    async with bus.subscribe(PLAN) as plans, bus.subscribe(POLICY) as policies, bus.subscribe(DECISIONS) as seen:
        await orchestrator._restore(plans, policies, seen)  # noqa: SLF001


async def decide(orchestrator: OrchestratorService, bus: Bus, **fields: Any) -> int:
    """A new decision's record, as `_record_and_execute` takes its id and publishes it."""
    decision_id = orchestrator.state.next_decision_id
    orchestrator.state = replace(orchestrator.state, next_decision_id=decision_id + 1)
    await orchestrator._publish(bus, record(decision_id, **fields))  # noqa: SLF001
    return decision_id


def record(decision_id: int, outcome: str = "pending") -> DecisionRecorded:
    return DecisionRecorded(decision_id=decision_id, trigger="node_down", action="migrate", outcome=outcome,  # type: ignore[arg-type]
                            at_s=time.time())  # fmt: skip


def test_a_restarted_orchestrator_without_records_is_accepted_and_an_old_record_replayed_is_stale(
        broker: LocalBroker, cluster: str, tmp_path: Path) -> None:  # fmt: skip
    """Orchestrator A decides twice (and republishes its first decision's outcome); the
    broker then loses the retained records. A worker restarted meanwhile (nothing retained
    to read) gets A's first record replayed live: stale, refused. Orchestrator B starts
    without records: its first id is above A's, and both the receiver that saw A's
    records and the restarted one accept B's (before the clock floor B started at 1, and
    the first receiver refused it as a replay of A's decision 1)."""
    settings = OrchestratorSettings(broker_url=broker.url, cluster=cluster, plan_signing_key=KEY,  # type: ignore[arg-type]
                                    shards_dir=tmp_path, retained_wait_s=0.3, max_message_age_s=AGE_S)  # fmt: skip
    lived, restarted = Receiver("lived-through"), Receiver("restarted")

    async def main() -> tuple[list[int], list[int], int]:
        async with (Bus(settings) as publisher, Bus(settings) as listener,
                    aiomqtt.Client("127.0.0.1", broker.port) as attacker, asyncio.TaskGroup() as group):  # fmt: skip
            await attacker.subscribe(DECISIONS.filter(cluster), qos=1)
            first_live = group.create_task(lived.run(listener))
            await lived.subscribed.wait()
            await listener.wait_ready(timeout_s=10)
            a = OrchestratorService(settings)
            await restore(a, publisher)
            a_ids = [await decide(a, publisher), await decide(a, publisher)]
            await a._publish(publisher, record(a_ids[0], "committed"))  # noqa: SLF001 - after decision 2
            pending = bytes((await anext(aiter(attacker.messages))).payload)  # type: ignore[arg-type]
            await until(lambda: lived.handled() >= 3)
            for decision_id in a_ids:  # the broker loses the retained records
                await attacker.publish(DECISIONS.topic(cluster, slot=str(decision_id % DECISION_SLOTS)), b"",
                                       qos=1, retain=True)  # fmt: skip
            issued_at_s = codec.decode(pending).message.issued_at_s  # type: ignore[attr-defined]
            await asyncio.sleep(max(0.0, issued_at_s + AGE_S + 0.3 - time.time()))
            async with Bus(settings) as restarted_bus:
                second_live = group.create_task(restarted.run(restarted_bus))
                await restarted.subscribed.wait()
                await restarted_bus.wait_ready(timeout_s=10)
                await attacker.publish(DECISIONS.topic(cluster, slot=str(a_ids[0] % DECISION_SLOTS)), pending, qos=1)
                await until(lambda: lived.handled() >= 4 and restarted.handled() >= 1)
                b = OrchestratorService(settings)
                await restore(b, publisher)
                b_id = await decide(b, publisher)
                await until(lambda: lived.handled() >= 5 and restarted.handled() >= 2)
                second_live.cancel()
            first_live.cancel()
        return a_ids, [b_id], b.state.next_decision_id

    a_ids, b_ids, _ = asyncio.run(asyncio.wait_for(main(), 60))
    assert b_ids[0] > max(a_ids), (a_ids, b_ids)
    assert a_ids[0] >= int((time.time() - 60) * 1000)  # the clock floor (ms), not 1
    assert lived.accepted == [(a_ids[0], 1), (a_ids[1], 1), (a_ids[0], 2), (b_ids[0], 1)], lived.accepted
    assert lived.gate.refusals() == {"DecisionRecorded_stale": 1}
    assert restarted.accepted == [(b_ids[0], 1)], restarted.accepted
    assert restarted.gate.refusals() == {"DecisionRecorded_stale": 1}  # it had nothing to compare the replay with
