"""The scenario runner's events on a real Mosquitto, against the worker's own emulation
follower (services/worker/emulation.py): two link traces through one node at the same
times (the V2X handover: car->rsu1 fades while car->rsu2 rises) must both arrive. Each
command is the node's state plus a change, numbered one above the state's; sent at once,
two carried the same number and the node refused one as a replay, so the shipped V2X
scenario ran with rsu2 stuck at 40 kB/s in some policies."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from services.cli.scenarios.events import EventDriver
from services.cli.scenarios.spec import Event, TracePoint
from services.worker.compute import Slowdown
from services.worker.emulation import Emulation
from services.worker.shaper import EgressSchedule, LinkShape
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import PrivacyPolicy
from shared.security.signing import ControlGate

pytestmark = pytest.mark.timeout(90)
KEY = "service-test-key-0123456789"
FADE = (TracePoint(0.0, 12.5e6, 0.002), TracePoint(0.3, 300e3, 0.01), TracePoint(0.6, 20e3, 0.04))
RISE = (TracePoint(0.0, 20e3, 0.04), TracePoint(0.3, 300e3, 0.01), TracePoint(0.6, 12.5e6, 0.002))


def test_two_traces_through_one_node_at_the_same_times_both_arrive(broker: LocalBroker, cluster: str) -> None:
    settings = BusSettings(broker_url=broker.url, cluster=cluster, plan_signing_key=KEY)  # type: ignore[arg-type]
    schedule = EgressSchedule()
    car = Emulation("car", Slowdown(1.0), schedule)
    car.gate = ControlGate(KEY, "car")
    stack = SimpleNamespace(settings=settings, policy="adaptive",
                            topology=SimpleNamespace(privacy_policy=PrivacyPolicy))  # fmt: skip
    events = (Event(at_s=0.0, kind="link_trace", src="car", dst="rsu1", one_way=True, trace=FADE),
              Event(at_s=0.0, kind="link_trace", src="car", dst="rsu2", one_way=True, trace=RISE))  # fmt: skip

    async def main() -> EventDriver:
        async with Bus(settings) as worker_bus, Bus(settings) as runner_bus, asyncio.TaskGroup() as group:
            follower = group.create_task(car.run(worker_bus))
            await asyncio.sleep(0.5)  # its retained state is on the broker
            loop = asyncio.get_running_loop()
            began = loop.time()
            driver = EventDriver(stack, runner_bus, events, lambda: loop.time() - began)  # type: ignore[arg-type]
            await driver.run()
            follower.cancel()
        return driver

    driver = asyncio.run(asyncio.wait_for(main(), 60))
    assert [record.error for record in driver.applied if record.error] == []
    assert car.gate.refusals() == {}  # no command refused as a replay
    assert car.command_id == 6  # three points of each trace, one command each
    assert schedule.shape("rsu1") == LinkShape(20e3, 0.04)
    assert schedule.shape("rsu2") == LinkShape(12.5e6, 0.002)
