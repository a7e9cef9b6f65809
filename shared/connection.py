"""One MQTT connection of a `Bus` (shared/bus.py): its reconnect loop, its reader and
its subscription syncer.

`Connection.maintain` connects (trying the protocol candidates of `ProtocolChoice`),
reads until the connection drops, backs off (capped exponential, with jitter) and
repeats until closed. A connection knows its bus only through `ConnectionHooks`: the
client factory and three callbacks (a session started, the subscription state changed,
a message arrived). Received messages reach the ``received`` hook from paho's read
callback (shared/fastpath.py); QoS 0 publishes are written within the call. The bus
changes a connection's subscriptions through `add_filter` and `remove_filter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal
from urllib.parse import urlsplit

import aiomqtt
from aiomqtt.client import ProtocolVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from shared import fastpath
from shared.config import BusSettings
from shared.errors import BusError

log = logging.getLogger("shared.bus")
Plane = Literal["control", "data"]
PLANES: tuple[Plane, ...] = ("control", "data")
VERSIONS = {"5": ProtocolVersion.V5, "3.1.1": ProtocolVersion.V311}
"""The MQTT versions a ``protocol`` setting names ("auto" names none: try both)."""
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


class ProtocolChoice:
    """The MQTT version both connections of a bus speak: the one ``setting`` names, or
    for "auto" the first that connects (5, then 3.1.1), kept from then on."""

    def __init__(self, setting: str, url: str) -> None:
        self.version: ProtocolVersion | None = VERSIONS.get(setting)
        self._url = url

    def candidates(self) -> list[ProtocolVersion]:
        """The versions to try connecting with, in order."""
        if self.version is not None:
            return [self.version]
        return [ProtocolVersion.V5, ProtocolVersion.V311]

    def works(self, version: ProtocolVersion) -> None:
        """A connect with ``version`` succeeded: use it from now on."""
        if self.version is None:
            log.info("broker %s speaks MQTT %s", self._url, version.name)
        self.version = version


@dataclass(frozen=True)
class ConnectionHooks:
    """What a `Connection` calls on its owner (the `Bus`).

    ``make_client(plane, version)``: a new, unconnected client (Last Will, TLS, identity);
    ``session_started(plane)``: a connect succeeded (the bus counts it and, on the control
    plane, republishes its birth); ``changed()``: connected state or confirmed
    subscriptions changed (the bus recomputes its readiness); ``received(plane, topic,
    payload, retain)``: one message, called from paho's read callback (the hot path).
    """

    make_client: Callable[[Plane, ProtocolVersion], aiomqtt.Client]
    session_started: Callable[[Plane], Awaitable[None]]
    changed: Callable[[], None]
    received: Callable[[Plane, str, bytes, bool], None]


class Connection:
    """One MQTT connection with its reconnect loop, reader and subscription syncer.

    ``url``: the broker, for messages (redacted); ``protocol``: shared by the bus's
    connections. Constructor does no I/O; run `maintain` and `sync_subscriptions` as tasks.
    """

    def __init__(
        self,
        plane: Plane,
        settings: BusSettings,
        url: str,
        protocol: ProtocolChoice,
        hooks: ConnectionHooks,
    ) -> None:
        self.plane, self.settings, self.url = plane, settings, url
        self.client: aiomqtt.Client | None = None
        self.fast: fastpath.FastPath | None = None
        self.connected = asyncio.Event()
        self.last_error = "not connected yet"
        self._protocol, self._hooks = protocol, hooks
        # Bound once: paho's read callback calls it for every message.
        self._received = partial(hooks.received, plane)
        self._filters: Counter[str] = Counter()  # broker filter -> local subscriptions using it
        self._qos: dict[str, int] = {}
        self._acked: set[str] = set()
        self._dirty = asyncio.Event()
        self._closing = False
        self.takeovers = 0
        """Sessions of this connection another connection of the same identity took over."""
        self.dropped_at_s: float | None = None
        """Monotonic time of the last drop of a session (any cause)."""
        self.peers: tuple[Connection, ...] = ()
        """The bus's other connections (set by the bus): a broker restart or a stall of this
        process drops them too, a session take-over only this one."""

    # --- what the bus asks of it ------------------------------------------------------------

    def add_filter(self, filter_: str, qos: int) -> None:
        """One more local subscription uses broker filter ``filter_`` (at ``qos`` or less)."""
        self._filters[filter_] += 1
        self._qos[filter_] = max(qos, self._qos.get(filter_, 0))
        self._dirty.set()

    def remove_filter(self, filter_: str) -> None:
        """One local subscription of ``filter_`` ended; the last one unsubscribes it."""
        self._filters[filter_] -= 1
        if self._filters[filter_] <= 0:
            del self._filters[filter_]
            if not self._closing:  # a closing connection drops its subscriptions anyway
                self._dirty.set()

    def confirmed(self, filter_: str) -> bool:
        """True while connected and the broker acknowledged ``filter_`` on this session."""
        return self.connected.is_set() and filter_ in self._acked

    def ready(self) -> bool:
        """True while connected and every filter in use is acknowledged."""
        return self.connected.is_set() and set(self._filters) <= self._acked

    def close(self) -> None:
        """Stop reconnecting and syncing (the loops end at their next turn)."""
        self._closing = True

    # --- its own loops ----------------------------------------------------------------------

    async def maintain(self) -> None:
        """Connect, read until the connection drops, back off, repeat (until cancelled).

        A session taken over by another connection of this identity is counted
        (``takeovers``) and logged: see `_alone_dropped`. Consecutive take-overs back off like
        failed connects, so two processes of one identity do not replace each other in a
        tight loop."""
        settings = self.settings
        failures, streak = 0, 0
        closed_by_broker = False
        while not self._closing:
            dropped: int | None = None
            try:
                client = await self._connect()
                failures = 0
                if closed_by_broker and self._alone_dropped():
                    streak = self._taken_over("the broker closed it alone, and is up", streak)
                closed_by_broker = False
                dropped = await self._session(client)
            except MQTT_ERRORS as error:
                self.last_error = str(error) or type(error).__name__
                closed_by_broker = False
                log.info("%s connection to %s lost: %s", self.plane, self.url, self.last_error)
            if dropped == SESSION_TAKEN_OVER:
                streak = self._taken_over("DISCONNECT 142, session taken over", streak)
                failures = streak
            elif dropped == CONNECTION_LOST and not self._closing:
                closed_by_broker = True  # Mosquitto 2.0 closes a taken-over session with no reason
                failures = streak
            else:
                streak = 0
            delay_s = min(settings.reconnect_max_s, settings.reconnect_initial_s * 2**failures)
            failures = min(failures + 1, 30)
            await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))  # jitter: no herds

    def _alone_dropped(self) -> bool:
        """True when this connection's last drop was its own: some other connection of the
        bus to the same broker host (the secure profile's data plane has a listener of its
        own on the same broker) stayed up through it (within DROP_WINDOW_S either side).
        A broker restart, a network cut or a stall of this process (the broker drops a
        silent client) ends every connection to that broker at once; a take-over (Mosquitto
        2.0 closes the old session's socket with no reason) ends one."""
        if self.dropped_at_s is None:
            return False
        same = [peer for peer in self.peers if _host(peer.url) == _host(self.url)]
        return bool(same) and all(peer.dropped_at_s is None or abs(peer.dropped_at_s - self.dropped_at_s)
                                  > DROP_WINDOW_S for peer in same)  # fmt: skip

    def _taken_over(self, how: str, streak: int) -> int:
        """Count one take-over of this connection's session, log it (the first and every
        100th), and return the streak of consecutive ones."""
        self.takeovers += 1
        if self.takeovers == 1 or self.takeovers % 100 == 0:
            log.warning("%s session on %s taken over by another connection of this identity (%s; %d so "
                        "far); reconnecting", self.plane, self.url, how, self.takeovers)  # fmt: skip
        return min(streak + 1, 30)

    async def _connect(self) -> aiomqtt.Client:
        errors = []
        for version in self._protocol.candidates():
            client = self._hooks.make_client(self.plane, version)
            try:
                async with asyncio.timeout(2 * self.settings.connect_timeout_s + 1):
                    await client.__aenter__()
            except MQTT_ERRORS as error:
                fastpath.abandon(client)
                errors.append(f"MQTT {version.name}: {error or type(error).__name__}")
                continue
            self._protocol.works(version)
            return client
        raise aiomqtt.MqttError("; ".join(errors))

    async def _session(self, client: aiomqtt.Client) -> int | None:
        """Serve one connection until it drops; the reason code it dropped with (see
        `drop_reason`), raised as an MqttError otherwise."""
        try:
            self.client = client
            self.fast = fastpath.FastPath(client, self._received, qos0_only=self.plane == "data")
            self.connected.set()
            self._dirty.set()
            await self._hooks.session_started(self.plane)
            try:
                async for _ in client.messages:  # nothing is queued there: this waits for a disconnect
                    pass
            except aiomqtt.MqttError as error:
                reason = drop_reason(client)
                if reason is None:
                    raise
                self.last_error = str(error)
                log.info("%s connection to %s lost: reason code %d", self.plane, self.url, reason)
                return reason
            return None
        finally:
            self.dropped_at_s = time.monotonic()
            self.client, self.fast = None, None
            self.connected.clear()
            self._acked.clear()
            self._hooks.changed()
            with contextlib.suppress(*MQTT_ERRORS):
                await asyncio.shield(client.__aexit__(None, None, None))

    async def sync_subscriptions(self) -> None:
        """Bring the broker's subscriptions in line with the filters whenever they change."""
        while not self._closing:
            await self._dirty.wait()
            self._dirty.clear()
            client = self.client
            if client is None:
                continue  # the next session sets dirty again
            try:
                await self._sync(client)
            except MQTT_ERRORS as error:
                log.warning("%s subscriptions not synced: %s; retrying", self.plane, error)
                await asyncio.sleep(self.settings.reconnect_initial_s)
                self._dirty.set()
            self._hooks.changed()

    async def _sync(self, client: aiomqtt.Client) -> None:
        timeout_s = self.settings.publish_timeout_s
        for stale in [f for f in self._acked if f not in self._filters]:
            await client.unsubscribe(stale, timeout=timeout_s)
            self._acked.discard(stale)
        new = sorted(f for f in self._filters if f not in self._acked)
        if not new:
            return
        v5 = self._protocol.version == ProtocolVersion.V5
        request: list[Any] = [
            (f, SubscribeOptions(qos=self._qos[f]) if v5 else self._qos[f]) for f in new
        ]
        codes = await client.subscribe(request, timeout=timeout_s)
        if client is not self.client:
            return  # the connection dropped meanwhile; the next session resubscribes
        for filter_, code in zip(new, codes, strict=False):
            if getattr(code, "is_failure", code == 0x80):
                log.error("broker refused subscription %s (%s): check the ACLs", filter_, code)
            else:
                self._acked.add(filter_)

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Publish ``payload`` on ``topic``; QoS 0 while connected is written within the
        call. Raises BusError when not done within publish_timeout_s or refused."""
        if qos == 0 and self.fast is not None:  # the hot path: straight to the socket
            self.fast.publish(topic, payload, retain)
            return
        timeout_s = self.settings.publish_timeout_s
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
                f"{self.url}: {self.last_error})"
            ) from None
        except aiomqtt.MqttError as error:
            raise BusError(f"publish to {topic} failed: {error}") from error


DROP_WINDOW_S = 2.0
"""Drops of two connections this close together share a cause (not a take-over)."""
SESSION_TAKEN_OVER = 142
"""MQTT 5 DISCONNECT reason: another connection with this client id replaced the session."""
CONNECTION_LOST = 128
"""What paho reports when the socket closed without a DISCONNECT ("Unspecified error")."""


def _host(url: str) -> str:
    """The host of a broker URL (two listeners of one broker share it)."""
    return urlsplit(url).hostname or url


def drop_reason(client: aiomqtt.Client) -> int | None:
    """The reason code a connection that dropped ended with: the broker's DISCONNECT
    reason (MQTT 5), CONNECTION_LOST for a socket the broker closed (paho's conversion of
    a lost connection), None when it is not known (a socket error on our side)."""
    disconnected = client._disconnected  # noqa: SLF001 - aiomqtt keeps the reason only there
    if not disconnected.done() or disconnected.cancelled():
        return None
    error = disconnected.exception()
    code = getattr(error, "rc", None)
    value = getattr(code, "value", None)
    return value if isinstance(value, int) else None


def _reraise_lost_cancellation() -> None:
    """aiomqtt waits for a PUBACK with ``asyncio.wait_for``, which in Python 3.11 returns
    the result instead of raising when a cancellation races with the reply (42 of 3000
    cancelled QoS 1 publishes, docs/MONITOR.md); a loop that lost its cancellation that
    way never stops. The task still counts the cancellation: raise it again."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
