"""The monitor's publishing loops end when cancelled, even when a publish swallows the
cancellation (what ``asyncio.wait_for`` inside aiomqtt does in Python 3.11 when the
PUBACK races with it; the monitor then never exited after SIGTERM)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.monitor.service import publish
from shared.messages import CapacityProfile
from shared.topics import CAPACITY

PROFILE = CapacityProfile(as_of_s=1.0, nodes=(), links=(), model_id="", layers=())


class SwallowingBus:
    """Its publish completes in spite of a cancellation, as aiomqtt's can."""

    def __init__(self) -> None:
        self.published = 0

    async def publish(self, topic: Any, message: Any) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # the reply had arrived: wait_for returns it and drops the cancellation
        self.published += 1


def test_a_publish_that_swallows_the_cancellation_still_ends_the_loop() -> None:
    async def main() -> int:
        bus = SwallowingBus()

        async def loop() -> None:  # the shape of the monitor's publishing loops
            while True:
                await publish(bus, CAPACITY, PROFILE)  # type: ignore[arg-type]

        task = asyncio.create_task(loop())
        await asyncio.sleep(0.01)
        task.cancel()
        async with asyncio.timeout(2):
            with pytest.raises(asyncio.CancelledError):
                await task
        return bus.published

    assert asyncio.run(main()) == 1
