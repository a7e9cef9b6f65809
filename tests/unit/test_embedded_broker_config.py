"""shared/embedded_broker.py and the Mosquitto lookup: the embedded broker carries the
bus (MQTT 3.1.1, QoS 1, retained messages) and stops; EDGESPLIT_MOSQUITTO chooses or hides
the binary."""

from __future__ import annotations

import asyncio

import pytest

from shared.broker import find_mosquitto, free_port, mqtt_answers
from shared.bus import Bus
from shared.config import BusSettings
from shared.embedded_broker import EmbeddedBroker
from shared.errors import BrokerUnavailable
from shared.topics import PLAN
from tests.integration.cluster import make_plan

KEY = "ab" * 32


def test_the_embedded_broker_carries_retained_plans_and_stops() -> None:
    broker = EmbeddedBroker(free_port()).start()
    try:
        settings = BusSettings(broker_url=broker.url, cluster="emb", protocol="3.1.1", plan_signing_key=KEY)

        async def main() -> int:
            async with Bus(settings) as bus:
                await bus.publish(PLAN, make_plan(7, "car", [("car", 0, 6)], KEY))
            async with Bus(settings) as reader, reader.subscribe(PLAN) as plans:  # a later subscriber
                async with asyncio.timeout(10):
                    _, plan = await plans.get()
            return plan.epoch

        assert asyncio.run(main()) == 7
    finally:
        broker.stop()
    assert not mqtt_answers("127.0.0.1", broker.port)


def test_a_taken_port_is_broker_unavailable() -> None:
    broker = EmbeddedBroker(free_port()).start()
    try:
        with pytest.raises(BrokerUnavailable, match="did not start"):
            EmbeddedBroker(broker.port).start(ready_timeout_s=5)
    finally:
        broker.stop()


def test_edgesplit_mosquitto_hides_or_chooses_the_binary(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EDGESPLIT_MOSQUITTO", "none")
    assert find_mosquitto() is None
    binary = tmp_path / "mosquitto"
    binary.write_text("#!/bin/sh\n")
    monkeypatch.setenv("EDGESPLIT_MOSQUITTO", str(binary))
    assert find_mosquitto() is None  # not executable
    binary.chmod(0o755)
    assert find_mosquitto() == str(binary)
