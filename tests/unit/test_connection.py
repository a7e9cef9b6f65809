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
