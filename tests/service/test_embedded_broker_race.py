"""The embedded broker (amqtt) keeps every session when clients connect and subscribe at
once (shared/embedded_broker.py: _SnapshotDict).

amqtt 0.12 walks its topic-filter table across awaits when a session starts (the retained
messages of every filter) and on each broadcast. Without the snapshot table, another
client's new subscription meanwhile raised "dictionary changed size during iteration" and
the broker dropped the starting session: in a run of this test, 35 of 40 clients lost
theirs. Behind the outside CI's `up` exiting 1 when its car worker lost its session.
"""

from __future__ import annotations

import asyncio
import socket

import aiomqtt
from aiomqtt.client import ProtocolVersion

from shared.embedded_broker import EmbeddedBroker

CLIENTS = 24
FILTERS = 24
GROUPS = 5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _client(port: int, index: int) -> None:
    """Connect (staggered, so sessions start while others subscribe), subscribe to filters
    that match retained messages and to filters of its own (new table keys), then receive
    the retained marker: only a session the broker kept gets it."""
    await asyncio.sleep(index * 0.03)
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"race-{index}",
                              protocol=ProtocolVersion.V311, timeout=20) as client:  # fmt: skip
        for n in range(FILTERS):
            await client.subscribe(f"r/{index % GROUPS}/{n}/#", qos=1)
            await client.subscribe(f"own/{index}/{n}", qos=1)
        await client.subscribe("marker", qos=1)
        async with asyncio.timeout(20):
            async for message in client.messages:
                if message.topic.value == "marker":
                    return


async def _race(port: int) -> list[BaseException | None]:
    async with aiomqtt.Client("127.0.0.1", port, identifier="race-publisher",
                              protocol=ProtocolVersion.V311) as publisher:  # fmt: skip
        await publisher.publish("marker", b"1", qos=1, retain=True)
        for group in range(GROUPS):
            for n in range(FILTERS):
                await publisher.publish(f"r/{group}/{n}/state", b"x" * 2000, qos=1, retain=True)
    results = await asyncio.gather(*(_client(port, i) for i in range(CLIENTS)), return_exceptions=True)
    return list(results)


def test_concurrent_sessions_and_subscriptions_keep_every_session() -> None:
    broker = EmbeddedBroker(_free_port()).start()
    try:
        results = asyncio.run(_race(broker.port))
    finally:
        broker.stop()
    lost = [(index, repr(result)) for index, result in enumerate(results) if result is not None]
    assert not lost, f"{len(lost)} of {CLIENTS} clients lost their session: {lost[:3]}"


def test_the_table_iterates_a_snapshot() -> None:
    from shared.embedded_broker import _SnapshotDict

    table = _SnapshotDict(a=1, b=2)
    for key in table:
        table[key + "x"] = 0  # a plain dict raises RuntimeError here
    for key, _ in table.items():
        del table[key]
    assert table == {}
