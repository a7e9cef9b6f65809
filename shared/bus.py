"""The MQTT adapter at the process edge (aiomqtt 2.5.x).

One `Bus` owns two connections: ``control`` (status, telemetry, plans, commands) and
``data`` (activation frames), so a 1 MB frame never delays a heartbeat. Each has a
reconnect loop (capped exponential backoff with jitter) that resubscribes and, on the
control connection, republishes the retained birth message; the Last Will is set on
every connect. Received messages are decoded in paho's read callback (shared/fastpath.py)
and put into the bounded queue of every matching `Subscription`; a malformed payload is
logged and dropped. QoS 0 publishes (activation frames, telemetry) are written to the
socket within the call. Nothing here needs MQTT 5: ``protocol="auto"`` tries 5, then 3.1.1.

    async with Bus(settings, birth=online, will=offline) as bus:
        async with bus.subscribe(TELEMETRY) as telemetry:      # waits for the SUBACK
            await bus.publish(NODE_STATUS, status, node="w1")
            async for params, message in telemetry: ...
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections import Counter
from itertools import count
from typing import Any, TypeVar

import aiomqtt
from aiomqtt.client import ProtocolVersion

from shared import codec, fastpath, topics
from shared.config import BusSettings, client_tls_context
from shared.connection import MQTT_LOG, PLANES, Connection, ConnectionHooks, Plane, ProtocolChoice
from shared.errors import BrokerUnavailable, BusError, DecodeError, WireError
from shared.frame_headers import FrameHeader
from shared.ids import validate_id
from shared.messages import Message
from shared.messages.base import is_signed_kind, sign
from shared.security.role_keys import RoleSigner, load_signer
from shared.security.signing import require_control_key
from shared.subscription import Announcement, Delivery, Subscription
from shared.tensor_frame import Frame, decode_frame, encode_frame
from shared.topics import Topic

log = logging.getLogger(__name__)
__all__ = ["Announcement", "Bus", "Delivery", "Subscription"]
P = TypeVar("P")
_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


class Bus:
    """Both MQTT connections of a process, typed publish and subscribe. An async context manager.

    Raises BrokerUnavailable on entry when no broker answers within connect_timeout_s.
    """

    def __init__(
        self,
        settings: BusSettings,
        *,
        origin: str | None = None,
        birth: Announcement[Any] | None = None,
        will: Announcement[Any] | None = None,
    ):
        self.settings = settings
        self.cluster = settings.cluster
        self.url = settings.broker.redacted()
        self.origin = validate_id(
            origin or settings.client_id or f"p{secrets.token_hex(5)}", "origin"
        )
        self.ready = asyncio.Event()
        """Set while both connections are up and every subscription is confirmed."""
        self.sessions = 0
        """Successful connects so far, both connections together."""
        self.counters: Counter[str] = Counter()
        self._signing_key: str | None = None
        self._role_signer: RoleSigner | None = None
        """malformed:<pattern>, overflow:<pattern>, unroutable."""
        self._protocol = ProtocolChoice(settings.protocol, self.url)
        self._addresses = {plane: settings.broker_for(plane) for plane in PLANES}
        """Each plane's broker: one, or a data-plane broker apart (``data_broker_url``)."""
        # ConfigError now, not per connect
        self._tls_contexts = {plane: client_tls_context(settings, self._addresses[plane]) for plane in PLANES}
        for announcement in (birth, will):
            if announcement is not None and not announcement.topic.retain:
                raise WireError(f"birth/will topic {announcement.topic.pattern} must be retained")
        self._birth, self._will = birth, will
        self._seq = count(1)
        self._subscriptions: dict[Topic[Any], list[Subscription[Any]]] = {}
        hooks = ConnectionHooks(self._make_client, self._session_started, self._refresh,
                                self._dispatch)  # fmt: skip
        self._connections: dict[Plane, Connection] = {
            plane: Connection(plane, settings, self._addresses[plane].redacted(), self._protocol, hooks)
            for plane in PLANES
        }
        for connection in self._connections.values():  # what tells a take-over from a broker restart
            connection.peers = tuple(c for c in self._connections.values() if c is not connection)
        self._changed = asyncio.Event()  # replaced (and the old one set) on every change
        self._task_group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def protocol(self) -> ProtocolVersion | None:
        """The MQTT version in use (None under "auto" before the first connect)."""
        return self._protocol.version

    def refusals(self) -> dict[str, int]:
        """What the broker connections refused to lose quietly, for a service's status:
        ``Session_takenover``, the sessions another connection of this identity took over
        (shared/connection.py; absent while none)."""
        takeovers = sum(connection.takeovers for connection in self._connections.values())
        return {"Session_takenover": takeovers} if takeovers else {}

    def connection(self, plane: Plane) -> Connection:
        """The connection of ``plane`` (its state: connected, client, fast path)."""
        return self._connections[plane]

    async def __aenter__(self) -> Bus:
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        for plane, connection in self._connections.items():
            self._tasks.append(
                self._task_group.create_task(connection.maintain(), name=f"bus-{plane}")
            )
            self._tasks.append(self._task_group.create_task(connection.sync_subscriptions()))
        timeout_s = self.settings.connect_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                for connection in self._connections.values():
                    await connection.connected.wait()
        except TimeoutError:
            down = next(c for c in self._connections.values() if not c.connected.is_set())
            await self._shutdown()
            setting = "data_broker_url" if down.url != self.url else "broker_url"
            raise BrokerUnavailable(
                f"no MQTT broker answered at {down.url} within {timeout_s} s ({down.last_error}); "
                f"check {setting} and that the broker runs"
            ) from None
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self._will is not None and self._connections["control"].connected.is_set():
                # A clean exit sends no Last Will: publish the offline status ourselves.
                try:
                    await self._announce(self._will)
                except BusError as error:
                    log.warning("could not publish the offline status: %s", error)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        for connection in self._connections.values():
            connection.close()
        for subscriptions in list(self._subscriptions.values()):
            for subscription in list(subscriptions):
                subscription.close()
        assert self._task_group is not None
        try:
            await self._cancel_tasks()
        finally:
            # Not the caller's exception: the TaskGroup would wrap it in an ExceptionGroup.
            # Only a failure of our own tasks (a bug) comes out as one.
            await self._task_group.__aexit__(None, None, None)

    async def _cancel_tasks(self) -> None:
        """Cancel our tasks until they end: asyncio.wait_for in Python 3.11 (used inside
        aiomqtt) can swallow a cancellation that races with the awaited reply."""
        pending = {task for task in self._tasks if not task.done()}
        for _ in range(100):
            if not pending:
                return
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        log.error("bus tasks did not stop: %s", pending)

    # --- publishing ---------------------------------------------------------------------------

    async def publish(self, topic: Topic[P], message: P, **params: str) -> None:
        """Publish a control message on ``topic`` (filled with ``params``).

        Raises InvalidId for a bad parameter, WireError for a message of the wrong kind,
        BusError when not published within publish_timeout_s. A control message that
        carries a signature is (re)signed with the process's control key: a copy of a
        received message with a changed field (a decision's outcome) must not go out with
        the old signature (shared/security/signing.py; ConfigError on mqtts:// without a key).
        A kind with an ``issued_at_s`` (NodeDown, NodeJoined, EmulationCommand,
        DecisionRecorded) is stamped with the time now before it is signed: receivers
        refuse one older than ``max_message_age_s`` (`ControlGate.timely`).
        """
        if topic.plane != "control" or not isinstance(message, topic.kinds):
            raise WireError(f"{type(message).__name__} cannot be published on {topic.pattern}")
        wire: Message = message
        if is_signed_kind(wire):
            if "issued_at_s" in type(wire).model_fields:
                wire = wire.model_copy(update={"issued_at_s": time.time()})
            wire = self._sign(wire)
        payload = codec.encode(wire, origin=self.origin, seq=next(self._seq))
        await self._connections["control"].publish(
            topic.topic(self.cluster, **params), payload, topic.qos, topic.retain
        )

    def _sign(self, message: Message) -> Message:
        """``message`` signed with this process's role key (shared/security/role_keys.py)
        when it has one, else with the cluster HMAC key."""
        if self.settings.role_key_file is not None:
            if self._role_signer is None:
                self._role_signer = load_signer(self.settings.role_key_file)
            return self._role_signer.sign(message)
        return sign(message, self._control_key())

    def _control_key(self) -> str:
        """The key control messages are signed with (shared/security/signing.py)."""
        if self._signing_key is None:
            self._signing_key = require_control_key(self.settings, f"publisher {self.origin}")
        return self._signing_key

    async def publish_frame(
        self, topic: Topic[Frame], header: FrameHeader, tensor: Any, **params: str
    ) -> None:
        """Publish a tensor (numpy array or CPU torch tensor) as a frame on a data topic."""
        if topic.plane != "data":
            raise WireError(f"{topic.pattern} is not a data topic")
        name = topic.topic(self.cluster, **params)
        payload = encode_frame(header, tensor)
        await self._connections["data"].publish(name, payload, topic.qos, topic.retain)

    async def publish_raw_frame(self, topic: Topic[Frame], payload: bytes, **params: str) -> None:
        """Publish an already encoded frame (see `encode_frame`) on a data topic."""
        if topic.plane != "data":
            raise WireError(f"{topic.pattern} is not a data topic")
        name = topic.topic(self.cluster, **params)
        await self._connections["data"].publish(name, payload, topic.qos, topic.retain)

    def set_birth(self, announcement: Announcement[Any]) -> None:
        """Replace the birth message republished after every reconnect (e.g. a new status)."""
        if not announcement.topic.retain:
            raise WireError(f"birth topic {announcement.topic.pattern} must be retained")
        self._birth = announcement

    async def _announce(self, announcement: Announcement[Any]) -> None:
        await self.publish(announcement.topic, announcement.message, **announcement.params)

    async def _session_started(self, plane: Plane) -> None:
        """A connection is up: count it; the control connection republishes the birth."""
        self.sessions += 1
        if plane == "control" and self._birth is not None:
            await self._announce(self._birth)

    # --- subscribing --------------------------------------------------------------------------

    def subscribe(
        self, topic: Topic[P], *, queue_size: int | None = None, **params: str
    ) -> Subscription[P]:
        """Subscribe to ``topic``; parameters not given match anything (``+``).

        Returns at once; ``await sub.active.wait()`` or ``async with`` for confirmation.
        """
        filter_ = topic.filter(self.cluster, **params)
        subscription = Subscription(
            topic, dict(params), filter_, queue_size or topic.queue_size,
            counters=self.counters, confirm_timeout_s=self.settings.connect_timeout_s,
            on_close=self._unsubscribe,
        )  # fmt: skip
        self._subscriptions.setdefault(topic, []).append(subscription)
        self._connections[topic.plane].add_filter(filter_, topic.qos)
        self._refresh()
        return subscription

    def _unsubscribe(self, subscription: Subscription[Any]) -> None:
        self._subscriptions[subscription.topic].remove(subscription)
        self._connections[subscription.topic.plane].remove_filter(subscription.filter)

    async def wait_ready(self, *, min_sessions: int = 0, timeout_s: float | None = None) -> None:
        """Wait until ready and at least ``min_sessions`` connects happened (BusError on timeout)."""
        timeout_s = self.settings.connect_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while not (self.ready.is_set() and self.sessions >= min_sessions):
                    await self._changed.wait()
        except TimeoutError:
            raise BusError(f"bus to {self.url} not ready within {timeout_s} s") from None

    # --- internals ----------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Recompute every subscription's ``active`` flag and the bus's ``ready`` event."""
        ready = all(connection.ready() for connection in self._connections.values())
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                up = self._connections[subscription.topic.plane].confirmed(subscription.filter)
                (subscription.active.set if up else subscription.active.clear)()
        (self.ready.set if ready else self.ready.clear)()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _dispatch(self, plane: Plane, name: str, payload: bytes, retain: bool) -> None:
        """Decode one received message and queue it for every matching subscription."""
        found = topics.match(name)
        if found is None or found[1] != self.cluster or found[0].plane != plane:
            self.counters["unroutable"] += 1
            log.debug("dropped message on unexpected topic %s", name)
            return
        topic, _, params = found
        targets = [s for s in self._subscriptions.get(topic, ()) if s.matches(params)]
        if not targets:
            return
        item: Any
        envelope: codec.Envelope[Message] | None = None
        try:
            if plane == "data":
                item = Frame(*decode_frame(payload))
            else:
                envelope = codec.decode(payload, topic.kinds)
                item = envelope.message
        except DecodeError as error:
            self.counters[f"malformed:{topic.pattern}"] += 1
            log.warning("dropped malformed message on %s (%d bytes): %s", name, len(payload), error)
            return
        delivery = Delivery(params, item, envelope, retain)
        for subscription in targets:
            subscription.offer(delivery)

    def _make_client(self, plane: Plane, version: ProtocolVersion) -> aiomqtt.Client:
        settings, address = self.settings, self._addresses[plane]
        will = None
        if plane == "control" and self._will is not None:
            topic, params = self._will.topic, self._will.params
            payload = codec.encode(self._will.message, origin=self.origin, seq=next(self._seq))
            will = aiomqtt.Will(
                topic.topic(self.cluster, **params), payload, qos=topic.qos, retain=True
            )
        client = aiomqtt.Client(
            address.host,
            address.port,
            username=address.username,
            password=address.password,
            identifier=f"{self.cluster}-{self.origin}-{plane}",
            protocol=version,
            will=will,
            keepalive=settings.keepalive_s,
            timeout=settings.connect_timeout_s,
            tls_context=self._tls_contexts[plane],
            socket_options=_NODELAY,
            logger=MQTT_LOG,
        )
        client.pending_calls_threshold = 10_000  # we pipeline publishes; 10 warns constantly
        fastpath.set_connect_timeout(client, settings.connect_timeout_s)
        fastpath.guard_write_registration(client)
        return client
