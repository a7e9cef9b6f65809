"""`up` prepares the model on a daemon thread: a signal meanwhile is not held up by it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from services.cli.launcher import on_daemon_thread
from shared.errors import ConfigError


def test_a_cancelled_preparation_does_not_hold_the_loop_until_it_ends() -> None:
    gate = threading.Event()

    async def main() -> None:
        task = asyncio.create_task(on_daemon_thread(gate.wait, 60.0))
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
            await on_daemon_thread(fail)
        return await on_daemon_thread(sum, (1, 2, 3))

    assert asyncio.run(main()) == 6


def test_a_signal_while_the_broker_starts_stops_that_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.cli import launcher
    from shared.broker import LocalBroker, free_port, mqtt_answers, start_local_broker
    from shared.config import BusSettings

    port = free_port()
    gate, started = threading.Event(), list[LocalBroker]()

    def slow_start(settings: BusSettings, data_dir: Path) -> LocalBroker:
        gate.wait(30)  # the signal comes while the start is under way
        started.append(start_local_broker(port=port, data_dir=data_dir))
        return started[-1]

    monkeypatch.setattr(launcher, "ensure_broker", slow_start)
    settings = BusSettings(broker_url=f"mqtt://127.0.0.1:{port}", cluster="upbroker")  # type: ignore[arg-type]

    async def main() -> None:
        task = asyncio.create_task(launcher.start_broker(settings, tmp_path / "broker"))
        await asyncio.sleep(0.05)
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
        assert len(started) == 1 and started[0].process is None  # stopped by `start_broker`
        assert not mqtt_answers("127.0.0.1", port)
    finally:
        gate.set()
        for broker in started:
            broker.stop()
