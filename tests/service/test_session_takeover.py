"""A session taken over is counted by its victim (shared/connection.py), on a real broker.

Mosquitto 2.0.11 closes the old connection's socket when a new one asks for its client id
(no DISCONNECT 142 in either MQTT version): the victim tells it from a broker restart
because only that one of its connections dropped. It counts ``Session_takenover``, logs
one warning, reconnects with backoff (taking its session back) and keeps serving. A
broker restart, which drops both connections, counts nothing."""

from __future__ import annotations

import asyncio
import logging

import aiomqtt
import pytest
from aiomqtt.client import ProtocolVersion

from shared.broker import LocalBroker
from shared.bus import Bus, Subscription
from shared.config import BusSettings
from shared.messages import Telemetry
from shared.topics import TELEMETRY

VERSIONS = {"5": ProtocolVersion.V5, "3.1.1": ProtocolVersion.V311}


def settings_for(url: str, cluster: str, protocol: str) -> BusSettings:
    return BusSettings(broker_url=url, cluster=cluster, protocol=protocol, connect_timeout_s=3.0,  # type: ignore[arg-type]
                       reconnect_initial_s=0.05, reconnect_max_s=0.5)  # fmt: skip


def sample(n: int) -> Telemetry:
    return Telemetry(node="w1", window_s=1.0, cpu_utilisation=n / 100, memory_used_bytes=n, requests_in_flight=0)  # type: ignore[arg-type]


async def round_trip(bus: Bus, telemetry: Subscription[Telemetry], n: int) -> None:
    """The bus still serves: what it publishes comes back through its own subscription."""
    await bus.publish(TELEMETRY, sample(n), node="w1")
    async with asyncio.timeout(10):
        while (await telemetry.get()).message != sample(n):
            pass


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_taken_over_session_is_counted_and_the_victim_recovers(broker: LocalBroker, cluster: str, protocol: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    async def main() -> dict[str, int]:
        async with (Bus(settings_for(broker.url, cluster, protocol), origin="victim") as bus,
                    bus.subscribe(TELEMETRY) as telemetry):  # fmt: skip
            await round_trip(bus, telemetry, 1)
            assert bus.refusals() == {}
            sessions = bus.sessions
            identifier = f"{cluster}-victim-control"  # the id the victim's bus asks for
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier=identifier,
                                      protocol=VERSIONS[protocol]):  # fmt: skip
                await bus.wait_ready(min_sessions=sessions + 1, timeout_s=10)  # it took it back
            await round_trip(bus, telemetry, 2)  # and keeps serving
            return bus.refusals()

    with caplog.at_level(logging.WARNING, logger="shared.bus"):
        refusals = asyncio.run(asyncio.wait_for(main(), 30))
    assert refusals == {"Session_takenover": 1}
    warnings = [r.getMessage() for r in caplog.records if "taken over" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("control session"), warnings


def test_a_broker_restart_is_not_a_take_over(own_broker: LocalBroker, cluster: str) -> None:
    async def main() -> dict[str, int]:
        async with (Bus(settings_for(own_broker.url, cluster, "auto"), origin="victim") as bus,
                    bus.subscribe(TELEMETRY) as telemetry):  # fmt: skip
            await round_trip(bus, telemetry, 1)
            sessions = bus.sessions
            own_broker.stop()
            own_broker.start()
            await bus.wait_ready(min_sessions=sessions + 2, timeout_s=10)
            await round_trip(bus, telemetry, 2)
            return bus.refusals()

    assert asyncio.run(asyncio.wait_for(main(), 30)) == {}
