"""The embedded MQTT broker: amqtt (a maintained pure-Python broker) on a thread of its
own, for `edgesplit up` on a machine with no Mosquitto (`pip install` alone).

Its limits, as `up` says when it starts one: MQTT 3.1.1 only (the bus falls back to it),
no persistence (the retained plan and ledger live as long as the process), no ACLs and no
TLS, and every message passes through Python (about 3 ms small and 40 ms per 1 MB round
trip here against about 1 ms with Mosquitto: shared/design/facts.md). For trying the
system on a laptop; Mosquitto is the broker for anything else.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from shared.errors import BrokerUnavailable

log = logging.getLogger(__name__)

LIMITS = ("MQTT 3.1.1 only, no persistence (retained state lasts as long as `up`), open "
          "(no TLS, no ACLs), every message through Python (slower than Mosquitto)")  # fmt: skip
"""What `up` says about the embedded broker when it starts one."""


@dataclass
class EmbeddedBroker:
    """amqtt listening on ``host:port`` while started; ``stop()`` ends it."""

    port: int
    host: str = "127.0.0.1"
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _broker: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, ready_timeout_s: float = 15.0) -> EmbeddedBroker:
        """Start it and return once it listens; BrokerUnavailable when amqtt is missing or
        does not start."""
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise BrokerUnavailable("no Mosquitto and no amqtt: install Mosquitto (Debian: apt-get install "
                                    "mosquitto) or `pip install amqtt`") from None  # fmt: skip
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger("amqtt.broker").addFilter(_quiet_mqtt5_attempts)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        started = threading.Event()
        failure: list[BaseException] = []
        loop = self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                _snapshot_subscriptions(self._broker)
                loop.run_until_complete(self._broker.start())
            except BaseException as error:  # noqa: BLE001 - reported to the starting thread
                failure.append(error)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not started.wait(ready_timeout_s) or failure:
            why = f": {failure[0]}" if failure else f" within {ready_timeout_s} s"
            raise BrokerUnavailable(f"the embedded broker (amqtt) did not start on {self.host}:{self.port}{why}")
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or self._thread is None or not self._thread.is_alive():
            return
        if broker is not None:
            done = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                done.result(timeout=timeout_s)
            except Exception as error:  # noqa: BLE001 - stopping anyway
                log.warning("embedded broker did not shut down cleanly: %s", error)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=timeout_s)


class _SnapshotDict(dict):  # type: ignore[type-arg]
    """A dict whose iteration walks a copy of its keys (and items, values): amqtt 0.12
    iterates its topic-filter table across awaits (a new session's retained messages,
    each broadcast), so a subscription from another client meanwhile raised "dictionary
    changed size during iteration" and the broker dropped that session (seen as workers
    losing their sessions when many connect at once; tests/service/test_embedded_broker_race.py)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(super().keys()))

    def keys(self):  # type: ignore[no-untyped-def]
        return list(super().keys())

    def items(self):  # type: ignore[no-untyped-def]
        return list(super().items())

    def values(self):  # type: ignore[no-untyped-def]
        return list(super().values())


def _snapshot_subscriptions(broker: Any) -> None:
    """Give ``broker`` a subscription table that tolerates change during iteration (see
    _SnapshotDict); BrokerUnavailable if this amqtt keeps it elsewhere (its version is
    pinned: constraints.txt)."""
    table = getattr(broker, "_subscriptions", None)
    if not isinstance(table, dict):
        raise BrokerUnavailable("this amqtt version keeps no _subscriptions table; edgesplit needs amqtt 0.12")
    broker._subscriptions = _SnapshotDict(table)  # noqa: SLF001 - amqtt keeps no public hook


def _quiet_mqtt5_attempts(record: logging.LogRecord) -> bool:
    """False for amqtt's two warnings about a client trying MQTT 5 first (every edgesplit
    command with ``protocol`` auto does, then falls back to 3.1.1): expected, not news."""
    text = record.getMessage()
    return not (text.startswith("Invalid connection from")
                or (text.startswith("Failed to initialize client session: Invalid protocol") and text.endswith(": 5")))
