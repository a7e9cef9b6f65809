"""The bus signs control messages on publish (shared/bus.py, shared/security/signing.py),
on a real broker: what arrives carries a signature for the publisher's key, an updated
copy of a received (signed) message is signed anew, and a process on mqtts:// without a
key cannot publish a control message at all."""

from __future__ import annotations

import asyncio

import pytest

from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.errors import ConfigError
from shared.messages import DecisionRecorded
from shared.messages.base import signature_ok
from shared.topics import DECISIONS

KEY = "service-test-key-0123456789"


def test_published_control_messages_are_signed_and_resigned(broker: LocalBroker, cluster: str) -> None:
    settings = BusSettings(broker_url=broker.url, cluster=cluster, plan_signing_key=KEY)  # type: ignore[arg-type]

    async def main() -> list[DecisionRecorded]:
        got: list[DecisionRecorded] = []
        async with Bus(settings) as bus, bus.subscribe(DECISIONS, slot="1") as decisions:
            first = DecisionRecorded(decision_id=1, trigger="t", action="keep", outcome="pending")
            await bus.publish(DECISIONS, first, slot="1")
            got.append((await decisions.get()).message)
            updated = got[0].model_copy(update={"outcome": "committed"})  # keeps the old signature
            await bus.publish(DECISIONS, updated, slot="1")
            got.append((await decisions.get()).message)
        return got

    pending, committed = asyncio.run(asyncio.wait_for(main(), 20))
    assert pending.outcome == "pending" and signature_ok(pending, KEY)
    assert committed.outcome == "committed" and signature_ok(committed, KEY)
    assert committed.signature != pending.signature


def test_no_key_on_the_secure_profile_means_no_control_publish() -> None:
    bus = Bus(BusSettings(broker_url="mqtts://127.0.0.1:1"))  # no I/O until entered
    record = DecisionRecorded(decision_id=1, trigger="t", action="keep")
    with pytest.raises(ConfigError, match="refuses to start: the secure profile"):
        asyncio.run(bus.publish(DECISIONS, record, slot="1"))  # refused before any I/O
