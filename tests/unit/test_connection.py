"""shared/connection.py pieces that need no broker."""

from __future__ import annotations

import asyncio

import pytest

from shared.connection import _reraise_lost_cancellation


def test_a_cancellation_swallowed_by_wait_for_is_raised_again() -> None:
    async def swallowed() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass  # what asyncio.wait_for in Python 3.11 does when the reply races the cancel
        _reraise_lost_cancellation()

    async def normal() -> str:
        _reraise_lost_cancellation()
        return "published"

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(swallowed())
        assert await asyncio.create_task(normal()) == "published"

    asyncio.run(main())


def test_the_reason_a_connection_dropped_with() -> None:
    """MQTT 5 DISCONNECT 142 from the broker, and a socket the broker closed, as aiomqtt
    keeps them; a socket error on our side has no reason code."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from shared.connection import CONNECTION_LOST, SESSION_TAKEN_OVER, drop_reason

    async def reason(error: Exception | None) -> int | None:
        client = aiomqtt.Client("127.0.0.1", 1)  # never connected: no I/O
        if error is not None:
            client._disconnected.set_exception(error)  # noqa: SLF001 - what aiomqtt's callback does
        found = drop_reason(client)
        if error is not None:
            client._disconnected.exception()  # noqa: SLF001 - retrieved: no warning at exit
        return found

    taken = aiomqtt.MqttCodeError(ReasonCode(PacketTypes.DISCONNECT, "Session taken over"), "Unexpected disconnection")
    lost = aiomqtt.MqttCodeError(ReasonCode(PacketTypes.DISCONNECT, "Unspecified error"), "Unexpected disconnection")
    assert asyncio.run(reason(taken)) == SESSION_TAKEN_OVER == 142
    assert asyncio.run(reason(lost)) == CONNECTION_LOST == 128
    assert asyncio.run(reason(OSError("broken pipe"))) is None
    assert asyncio.run(reason(None)) is None


def test_a_drop_is_a_take_over_only_when_the_other_connection_stayed_up() -> None:
    from shared.config import BusSettings
    from shared.connection import DROP_WINDOW_S, Connection, ConnectionHooks, ProtocolChoice

    settings = BusSettings()
    hooks = ConnectionHooks(lambda *_: None, lambda *_: None, lambda: None, lambda *_: None)  # type: ignore[arg-type, return-value]
    control, data = (Connection(plane, settings, "mqtt://b:1883", ProtocolChoice("auto", "b"), hooks)  # type: ignore[arg-type]
                     for plane in ("control", "data"))  # fmt: skip
    control.peers, data.peers = (data,), (control,)
    control.dropped_at_s = 100.0
    assert control._alone_dropped()  # noqa: SLF001 - the data connection never dropped
    data.dropped_at_s = 100.0 + DROP_WINDOW_S / 2  # a broker restart, a stall: both at once
    assert not control._alone_dropped()  # noqa: SLF001
    data.dropped_at_s = 100.0 - 3 * DROP_WINDOW_S  # an earlier, unrelated drop
    assert control._alone_dropped()  # noqa: SLF001
    data.url = "mqtt://b:1884"  # another listener of the same broker (the secure profile's data plane)
    assert control._alone_dropped()  # noqa: SLF001
    data.url = "mqtt://other:1883"  # its own broker: says nothing about this one's
    assert not control._alone_dropped()  # noqa: SLF001
