"""One MQTT connection of a `Bus` (shared/bus.py): its reconnect loop, its reader and
its subscription syncer.

`Connection.maintain` connects (trying the bus's protocol candidates), reads until the
connection drops, backs off (capped exponential, with jitter) and repeats until the bus
closes. Received messages reach `Bus._dispatch` from paho's read callback
(shared/fastpath.py); QoS 0 publishes are written within the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal

import aiomqtt
from aiomqtt.client import ProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from shared import fastpath
from shared.errors import BusError

if TYPE_CHECKING:
    from shared.bus import Bus

log = logging.getLogger("shared.bus")
Plane = Literal["control", "data"]
MQTT_ERRORS = (aiomqtt.MqttError, OSError, TimeoutError)
MQTT_LOG = logging.getLogger("edgesplit.mqtt")
"""The logger handed to aiomqtt."""


class _LateAcks(logging.Filter):
    """aiomqtt logs an acknowledgement that arrives after its call was given up (timed out,
    or cancelled when a service stops) as an error with a traceback. It is harmless: keep
    it as a one-line debug record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Unexpected message ID"):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return MQTT_LOG.isEnabledFor(logging.DEBUG)


MQTT_LOG.addFilter(_LateAcks())


class Connection:
    """One MQTT connection with its reconnect loop, reader and subscription syncer."""

    def __init__(self, bus: Bus, plane: Plane):
        self.bus, self.plane = bus, plane
        self.client: aiomqtt.Client | None = None
        self.fast: fastpath.FastPath | None = None
        self.connected = asyncio.Event()
        self.filters: Counter[str] = Counter()  # broker filter -> local subscriptions using it
        self.qos: dict[str, int] = {}
        self.acked: set[str] = set()
        self.dirty = asyncio.Event()
        self.last_error = "not connected yet"

    async def maintain(self) -> None:
        """Connect, read until the connection drops, back off, repeat (until cancelled)."""
        settings = self.bus.settings
        failures = 0
        while not self.bus._closing:
            try:
                client = await self._connect()
                failures = 0
                await self._session(client)
            except MQTT_ERRORS as error:
                self.last_error = str(error) or type(error).__name__
                log.info("%s connection to %s lost: %s", self.plane, self.bus.url, self.last_error)
            delay_s = min(settings.reconnect_max_s, settings.reconnect_initial_s * 2**failures)
            failures = min(failures + 1, 30)
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))  # jitter: no herds

    async def _connect(self) -> aiomqtt.Client:
        errors = []
        for version in self.bus._protocol_candidates():
            client = self.bus._make_client(self.plane, version)
            try:
                async with asyncio.timeout(2 * self.bus.settings.connect_timeout_s + 1):
                    await client.__aenter__()
            except MQTT_ERRORS as error:
                abandon(client)
                errors.append(f"MQTT {version.name}: {error or type(error).__name__}")
                continue
            self.bus._protocol_works(version)
            return client
        raise aiomqtt.MqttError("; ".join(errors))

    async def _session(self, client: aiomqtt.Client) -> None:
        try:
            self.client = client
            self.fast = fastpath.FastPath(client, self._received, qos0_only=self.plane == "data")
            self.connected.set()
            self.dirty.set()
            self.bus.sessions += 1
            if self.plane == "control" and self.bus._birth is not None:
                await self.bus._announce(self.bus._birth)
            async for _ in client.messages:  # nothing is queued there: this waits for a disconnect
                pass
        finally:
            self.client, self.fast = None, None
            self.connected.clear()
            self.acked.clear()
            self.bus._refresh()
            with contextlib.suppress(*MQTT_ERRORS):
                await asyncio.shield(client.__aexit__(None, None, None))

    def _received(self, name: str, payload: bytes, retain: bool) -> None:
        self.bus._dispatch(self.plane, name, payload, retain)

    async def sync_subscriptions(self) -> None:
        """Bring the broker's subscriptions in line with ``filters`` whenever they change."""
        while not self.bus._closing:
            await self.dirty.wait()
            self.dirty.clear()
            client = self.client
            if client is None:
                continue  # the next session sets dirty again
            try:
                await self._sync(client)
            except MQTT_ERRORS as error:
                log.warning("%s subscriptions not synced: %s; retrying", self.plane, error)
                await asyncio.sleep(self.bus.settings.reconnect_initial_s)
                self.dirty.set()
            self.bus._refresh()

    async def _sync(self, client: aiomqtt.Client) -> None:
        timeout_s = self.bus.settings.publish_timeout_s
        for stale in [f for f in self.acked if f not in self.filters]:
            await client.unsubscribe(stale, timeout=timeout_s)
            self.acked.discard(stale)
        new = sorted(f for f in self.filters if f not in self.acked)
        if not new:
            return
        v5 = self.bus.protocol == ProtocolVersion.V5
        request: list[Any] = [
            (f, SubscribeOptions(qos=self.qos[f]) if v5 else self.qos[f]) for f in new
        ]
        codes = await client.subscribe(request, timeout=timeout_s)
        if client is not self.client:
            return  # the connection dropped meanwhile; the next session resubscribes
        for filter_, code in zip(new, codes, strict=False):
            if getattr(code, "is_failure", code == 0x80):
                log.error("broker refused subscription %s (%s): check the ACLs", filter_, code)
            else:
                self.acked.add(filter_)

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if qos == 0 and self.fast is not None:  # the hot path: straight to the socket
            self.fast.publish(topic, payload, retain)
            return
        timeout_s = self.bus.settings.publish_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self.connected.wait()
                assert self.client is not None and self.fast is not None  # set with connected
                if qos == 0:
                    self.fast.publish(topic, payload, retain)
                    return
                await self.client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout_s)
            _reraise_lost_cancellation()
        except TimeoutError:
            raise BusError(
                f"publish to {topic} not done in {timeout_s} s ({self.plane} connection to "
                f"{self.bus.url}: {self.last_error})"
            ) from None
        except aiomqtt.MqttError as error:
            raise BusError(f"publish to {topic} failed: {error}") from error


def abandon(client: aiomqtt.Client) -> None:
    """Close the socket of a client whose connect failed (aiomqtt leaves it open)."""
    with contextlib.suppress(Exception):
        client._client._sock_close()  # noqa: SLF001 - aiomqtt has no public way


def _reraise_lost_cancellation() -> None:
    """aiomqtt waits for a PUBACK with ``asyncio.wait_for``, which in Python 3.11 returns
    the result instead of raising when a cancellation races with the reply (42 of 3000
    cancelled QoS 1 publishes, docs/MONITOR.md); a loop that lost its cancellation that
    way never stops. The task still counts the cancellation: raise it again."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
