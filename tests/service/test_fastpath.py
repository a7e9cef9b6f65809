"""The bus's hot path against a real Mosquitto (shared/fastpath.py): QoS 0 frames reach
the socket inside the publish call, no write interest is left behind, received messages
go straight to the subscriptions, and a failing handler does not drop the connection."""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import signal
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.frame_headers import ActivationHeader
from shared.messages import TokenGenerated
from shared.subscription import Subscription
from shared.tensor_frame import Frame, encode_frame
from shared.topics import ACTIVATIONS, REPLIES


class WatchedLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop with its selector in view (the test checks which sockets
    it watches for writability)."""

    def __init__(self) -> None:
        self.watched = selectors.DefaultSelector()
        super().__init__(self.watched)


def run(main: Callable[[], Awaitable[None]], timeout_s: float = 20.0) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(timeout_s):
            await main()

    with asyncio.Runner(loop_factory=WatchedLoop) as runner:
        runner.run(guarded())


def settings_for(url: str, cluster: str, protocol: str = "auto") -> BusSettings:
    return BusSettings(broker_url=url, cluster=cluster, protocol=protocol, connect_timeout_s=3.0,  # type: ignore[arg-type]
                       reconnect_initial_s=0.05, reconnect_max_s=0.5)  # fmt: skip


def _frame(step: int) -> bytes:
    header = ActivationHeader(request_id="r1", step=step, epoch=1, seq=step, target=3, pos=0, last_only=False,  # type: ignore[arg-type]
                              pass_id=1)  # fmt: skip
    return encode_frame(header, np.full((1, 8), step, np.float32))


def _writers(bus: Bus) -> list[int]:
    """File descriptors the running loop watches for writability on the bus's sockets."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, WatchedLoop)
    sockets = []
    for plane in ("control", "data"):
        fast = bus.connection(plane).fast
        assert fast is not None
        sockets.append(fast.fileno())
    return [key.fd for key in loop.watched.get_map().values()
            if key.fd in sockets and key.events & selectors.EVENT_WRITE]  # fmt: skip


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_qos0_frames_are_written_within_the_call_in_order(
    broker: LocalBroker, cluster: str, protocol: str
) -> None:
    async def main() -> None:
        settings = settings_for(broker.url, cluster, protocol)
        async with Bus(settings, origin="tx") as sender, Bus(settings, origin="rx") as receiver:
            async with receiver.subscribe(ACTIVATIONS, node="w2") as frames:
                inner = sender.connection("data").fast
                assert inner is not None
                for step in range(200):
                    await sender.publish_raw_frame(ACTIVATIONS, _frame(step), node="w2")
                    # Written before the call returned: nothing left in paho's queue, and no
                    # write interest left on the loop (it would spin on a writable socket).
                    assert not inner.want_write()
                    assert _writers(sender) == []
                await asyncio.sleep(0.05)  # callbacks scheduled by the publishes have run
                assert _writers(sender) == []
                got: list[int] = []
                async with asyncio.timeout(5):
                    while len(got) < 200:
                        delivery = await frames.get()
                        assert isinstance(delivery.message, Frame)
                        got.append(delivery.message.header.step)
                        assert float(delivery.message.array[0, 0]) == delivery.message.header.step
                assert got == list(range(200))

    run(main)


def test_a_failing_subscriber_does_not_drop_the_connection(
    broker: LocalBroker, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        settings = settings_for(broker.url, cluster)
        async with Bus(settings, origin="tx") as sender, Bus(settings, origin="rx") as receiver:
            async with receiver.subscribe(ACTIVATIONS, node="w2") as frames:
                sessions = receiver.sessions
                original = Subscription.offer
                calls = 0

                def offer_failing_once(self: Subscription[object], delivery: object) -> None:
                    nonlocal calls
                    calls += 1
                    if calls == 1:
                        raise RuntimeError("a bug in a subscriber")
                    original(self, delivery)  # type: ignore[arg-type]

                monkeypatch.setattr(Subscription, "offer", offer_failing_once)
                await sender.publish_raw_frame(ACTIVATIONS, _frame(0), node="w2")
                await sender.publish_raw_frame(ACTIVATIONS, _frame(1), node="w2")
                async with asyncio.timeout(5):
                    delivery = await frames.get()
                assert delivery.message.header.step == 1  # type: ignore[attr-defined]
                assert calls == 2
                assert receiver.sessions == sessions  # no reconnect happened

    run(main)


def test_qos1_messages_still_wait_for_their_acknowledgement(
    broker: LocalBroker, cluster: str
) -> None:
    """QoS 1 publishes keep aiomqtt's wait for PUBACK through the direct write registration:
    all arrive, in order, and no write interest is left behind."""

    async def main() -> None:
        settings = settings_for(broker.url, cluster)
        async with Bus(settings, origin="tx") as sender, Bus(settings, origin="rx") as receiver:
            async with receiver.subscribe(REPLIES, client="c1") as replies:
                text = "x" * 1000
                for index in range(100):
                    reply = TokenGenerated(request_id="r1", index=index, token_id=index, text=text)  # type: ignore[arg-type]
                    await sender.publish(REPLIES, reply, client="c1")
                seen: list[int] = []
                async with asyncio.timeout(5):
                    while len(seen) < 100:
                        seen.append((await replies.get()).message.index)  # type: ignore[union-attr]
                assert seen == list(range(100))
                assert _writers(sender) == []

    run(main)


def test_a_frame_larger_than_the_socket_buffer_is_finished_when_writable(
    broker: LocalBroker, cluster: str
) -> None:
    async def main() -> None:
        settings = settings_for(broker.url, cluster)
        async with Bus(settings, origin="tx") as sender, Bus(settings, origin="rx") as receiver:
            async with receiver.subscribe(ACTIVATIONS, node="w2") as frames:
                big = np.arange(6_000_000, dtype=np.float32).reshape(1000, 6000)  # 24 MB
                header = ActivationHeader(request_id="r1", step=0, epoch=1, seq=0, target=3, pos=0, last_only=False,  # type: ignore[arg-type]
                                          pass_id=1)  # fmt: skip
                inner = sender.connection("data").fast
                assert inner is not None
                # The broker, stopped, reads nothing: the frame cannot leave in one write
                # (when it reads while we write, loopback can take all 24 MB at once).
                assert broker.process is not None  # the tests' own Mosquitto
                os.kill(broker.process.pid, signal.SIGSTOP)
                try:
                    await sender.publish_raw_frame(ACTIVATIONS, encode_frame(header, big), node="w2")
                    assert inner.want_write(), "a 24 MB frame should not fit the socket at once"
                    assert _writers(sender) != []  # the rest is written when the socket is writable
                    await sender.publish_raw_frame(
                        ACTIVATIONS, _frame(1), node="w2"
                    )  # queued behind it
                finally:
                    os.kill(broker.process.pid, signal.SIGCONT)
                async with asyncio.timeout(10):
                    first, second = await frames.get(), await frames.get()
                assert isinstance(first.message, Frame) and isinstance(second.message, Frame)
                assert first.message.header.step == 0 and np.array_equal(first.message.array, big)
                assert second.message.header.step == 1
                assert not inner.want_write() and _writers(sender) == []

    run(main)


def test_late_acknowledgements_are_not_logged_as_errors(caplog: pytest.LogCaptureFixture) -> None:
    """aiomqtt logs an ack that comes after its call was given up (a service stopping) as
    an error with a traceback; the bus keeps it out of the logs unless debug is on."""
    from shared.connection import MQTT_LOG

    caplog.set_level(logging.INFO)
    try:
        raise KeyError(29)
    except KeyError:
        MQTT_LOG.exception('Unexpected message ID "%d" in on_unsubscribe callback', 29)
    MQTT_LOG.error("a real error")
    assert [r.getMessage() for r in caplog.records] == ["a real error"]
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger=MQTT_LOG.name)
    MQTT_LOG.error('Unexpected message ID "%d" in on_subscribe callback', 30)
    assert [(r.levelname, r.exc_info) for r in caplog.records] == [("DEBUG", None)]
