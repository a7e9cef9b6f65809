"""The orchestrator's decision records on a real broker: each publication of a decision
carries the next revision, a receiver fencing as a worker does (`ControlGate.current`
with the delivery's retained flag) accepts every genuine one, an older decision's later
records included, and refuses a genuine record replayed into its slot by another client.
The replay needs no key: the attacker republishes the bytes it read."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import aiomqtt

from services.orchestrator.service import OrchestratorService
from services.orchestrator.settings import OrchestratorSettings
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import DecisionRecorded
from shared.security.signing import ControlGate
from shared.topics import DECISION_SLOTS, DECISIONS

KEY = "service-test-key-0123456789"


def record(decision_id: int, outcome: str = "pending") -> DecisionRecorded:
    return DecisionRecorded(decision_id=decision_id, trigger="node_down", action="migrate", outcome=outcome)  # type: ignore[arg-type]


def test_genuine_republications_pass_and_a_replayed_record_is_refused(broker: LocalBroker, cluster: str,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    settings = BusSettings(broker_url=broker.url, cluster=cluster, plan_signing_key=KEY)  # type: ignore[arg-type]
    orchestrator = OrchestratorService(OrchestratorSettings(broker_url=broker.url, cluster=cluster,  # type: ignore[arg-type]
                                                            plan_signing_key=KEY, shards_dir=tmp_path))  # fmt: skip
    gate = ControlGate(KEY, "receiver")
    accepted: list[tuple[int, int]] = []
    slot_1 = DECISIONS.topic(cluster, slot="1")

    handled = asyncio.Condition()

    async def receive(bus: Bus) -> None:
        async with bus.subscribe(DECISIONS) as decisions:
            async for delivery in decisions:
                if gate.signed(delivery.message) and gate.current(delivery.message, delivery.retained):
                    accepted.append((delivery.message.decision_id, delivery.message.revision))
                async with handled:
                    handled.notify_all()

    async def until(count: int) -> None:
        async with asyncio.timeout(10), handled:
            await handled.wait_for(lambda: len(accepted) + sum(gate.refusals().values()) >= count)

    async def main() -> bytes:
        async with (Bus(settings) as publisher, Bus(settings) as listener,
                    aiomqtt.Client("127.0.0.1", broker.port) as attacker, asyncio.TaskGroup() as group):  # fmt: skip
            await attacker.subscribe(slot_1, qos=1)
            task = group.create_task(receive(listener))
            await listener.wait_ready(timeout_s=10)
            orchestrator.state = replace(orchestrator.state, next_decision_id=3)
            await orchestrator._publish(publisher, record(1))  # noqa: SLF001
            pending = bytes((await anext(aiter(attacker.messages))).payload)  # type: ignore[arg-type]
            await orchestrator._publish(publisher, record(2))  # noqa: SLF001
            await orchestrator._publish(publisher, record(1, "committed"))  # noqa: SLF001 - after decision 2
            await orchestrator._publish(publisher, record(1, "committed").model_copy(  # noqa: SLF001
                update={"realised_tpot_s": 0.05}))  # the realised effect
            await until(4)
            await attacker.publish(slot_1, pending, qos=1, retain=True)  # the old record, into its slot
            await until(5)
            for decision_id in range(3, 3 + DECISION_SLOTS):  # slot 1 now holds decision 17
                orchestrator.state = replace(orchestrator.state, next_decision_id=decision_id + 1)
                await orchestrator._publish(publisher, record(decision_id))  # noqa: SLF001
            await orchestrator._publish(publisher, record(1, "committed"))  # noqa: SLF001 - kept, not published
            await until(5 + DECISION_SLOTS)
            task.cancel()
        return pending

    asyncio.run(asyncio.wait_for(main(), 60))
    assert accepted[:4] == [(1, 1), (2, 1), (1, 2), (1, 3)], accepted
    assert gate.refusals() == {"DecisionRecorded_replayed": 1}
    assert accepted[4:] == [(i, 1) for i in range(3, 3 + DECISION_SLOTS)]
    kept = {d.decision_id: d.revision for d in orchestrator.decisions}
    assert kept[1] == 4  # counted on: a later record of it would be revision 5
