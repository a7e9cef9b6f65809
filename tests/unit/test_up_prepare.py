"""`up` prepares the model on a daemon thread: a signal meanwhile is not held up by it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.cli.launcher import _on_daemon_thread
from shared.errors import ConfigError


def test_a_cancelled_preparation_does_not_hold_the_loop_until_it_ends() -> None:
    gate = threading.Event()

    async def main() -> None:
        task = asyncio.create_task(_on_daemon_thread(gate.wait, 60.0))
        await asyncio.sleep(0.05)
        task.cancel()  # what SIGINT does to `up`'s task
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())  # returns although the preparation still runs
        preparing = [t for t in threading.enumerate() if t.name == "up-prepare"]
        assert preparing and all(t.daemon and t.is_alive() for t in preparing)
    finally:
        gate.set()


def test_the_result_and_the_error_come_back() -> None:
    def fail() -> None:
        raise ConfigError("no such model")

    async def main() -> int:
        with pytest.raises(ConfigError, match="no such model"):
            await _on_daemon_thread(fail)
        return await _on_daemon_thread(sum, (1, 2, 3))

    assert asyncio.run(main()) == 6
