"""A data-plane broker apart from the control-plane broker (``data_broker_url``)."""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
import pytest

from shared.broker import LocalBroker, free_port
from shared.bus import Bus
from shared.config import BusSettings, load_settings
from shared.errors import BrokerUnavailable, ConfigError
from shared.frame_headers import ActivationHeader
from shared.messages import TokenGenerated
from shared.topics import ACTIVATIONS, REPLIES


def _settings(control: str, data: str | None, cluster: str) -> BusSettings:
    return BusSettings(broker_url=control, data_broker_url=data, cluster=cluster,  # type: ignore[arg-type]
                       connect_timeout_s=3.0, reconnect_initial_s=0.05, reconnect_max_s=0.5)  # fmt: skip


async def _nothing_within(subscription: object, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            await subscription.get()  # type: ignore[attr-defined]
    except TimeoutError:
        return True
    return False


def test_frames_go_through_the_data_broker_and_control_through_the_other(
    broker: LocalBroker, own_broker: LocalBroker
) -> None:
    cluster = "two" + secrets.token_hex(3)
    split = _settings(broker.url, own_broker.url, cluster)
    header = ActivationHeader(request_id="r1", step=0, epoch=1, seq=1, target=0, pos=0,  # type: ignore[arg-type]
                              last_only=False, pass_id=1)  # fmt: skip
    tensor = np.arange(576, dtype=np.float32)
    token = TokenGenerated(request_id="r1", index=0, token_id=7, text="x")  # type: ignore[arg-type]

    async def main() -> None:
        async with (
            Bus(split, origin="w1") as sender,
            Bus(split, origin="w2") as receiver,
            Bus(_settings(broker.url, None, cluster), origin="ctl") as control_only,
            Bus(_settings(own_broker.url, None, cluster), origin="dat") as data_only,
            receiver.subscribe(ACTIVATIONS, node="w2") as frames,
            receiver.subscribe(REPLIES, client="c1") as replies,
            control_only.subscribe(ACTIVATIONS, node="w2") as frames_on_control,
            control_only.subscribe(REPLIES, client="c1") as replies_on_control,
            data_only.subscribe(ACTIVATIONS, node="w2") as frames_on_data,
            data_only.subscribe(REPLIES, client="c1") as replies_on_data,
        ):
            await sender.publish_frame(ACTIVATIONS, header, tensor, node="w2")
            await sender.publish(REPLIES, token, client="c1")
            frame = await frames.get()
            assert np.array_equal(frame.message.array, tensor)
            assert (await replies.get()).message == token
            assert np.array_equal((await frames_on_data.get()).message.array, tensor)
            assert (await replies_on_control.get()).message == token
            # nothing crossed to the other broker
            assert await _nothing_within(frames_on_control, 0.5)
            assert await _nothing_within(replies_on_data, 0.1)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_unreachable_data_broker_is_named(broker: LocalBroker) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"

    async def main() -> None:
        async with Bus(_settings(broker.url, dead, "dead" + secrets.token_hex(3))):
            pass

    with pytest.raises(BrokerUnavailable, match=f"at {dead} within .*check data_broker_url"):
        asyncio.run(main())


def test_data_broker_url_is_validated() -> None:
    with pytest.raises(ConfigError, match="data_broker_url"):
        load_settings(BusSettings, {"data_broker_url": "http://x:1"})
    settings = load_settings(BusSettings, {"data_broker_url": "mqtt://site:1884"})
    assert (settings.broker_for("data").host, settings.broker_for("data").port) == ("site", 1884)
    assert settings.broker_for("control") == settings.broker
