"""Shortcuts around aiomqtt on the hot path of an established connection.

aiomqtt (2.5.x) turns every received message into its own ``Message`` (a validated
``Topic`` object) and queues it for an async iterator, and every publish goes through
``call_soon_threadsafe(add_writer)`` before paho writes a byte: two or three event-loop
iterations per message, about 0.3 ms of a decode step's hop on a loaded 2-core node
(docs/PERFORMANCE.md). Once a connection is up, all of paho's calls happen on the event
loop thread (aiomqtt drives paho's reads and writes from the loop), so:

- `FastPath` hands each received message straight to ``on_message(topic, payload,
  retain)`` from paho's read callback (no conversion, no queue), and registers paho's
  write interest with the loop directly instead of through ``call_soon_threadsafe``;
- `FastPath.publish` writes a QoS 0 message to the socket in the same call (paho's own
  ``loop_write``, no selector registration); what the socket does not take at once is
  written when it is writable.

aiomqtt's message iterator is still used to notice a disconnect. Only paho's documented
external-loop API (``loop_write``, the socket callbacks) and ``Client._client`` /
``Client._disconnected`` of aiomqtt are touched; tests/service/test_fastpath.py pins them.

Every other reach into aiomqtt's internals lives here too, each with its reason:
`abandon` (close the socket of a failed connect) and `set_connect_timeout` (paho's TCP
connect timeout). No other module touches a private member of a library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from shared.errors import BusError

log = logging.getLogger("shared.bus")

OnMessage = Callable[[str, bytes, bool], None]


def abandon(client: aiomqtt.Client) -> None:
    """Close the socket of a client whose connect failed (aiomqtt leaves it open)."""
    with contextlib.suppress(Exception):
        client._client._sock_close()  # noqa: SLF001 - aiomqtt has no public way to close it


def guard_write_registration(client: aiomqtt.Client) -> None:
    """Register paho's socket for writing only while it is open. aiomqtt schedules
    ``add_writer(fd)`` from paho's connect thread with the descriptor read then; when the
    connect fails first (a TLS listener refusing a client without a certificate) the socket
    is closed before the loop runs it, and asyncio prints an OSError traceback. Here the
    descriptor is read on the loop, and a closed socket (-1) is not registered."""
    loop, paho = client._loop, client._client  # noqa: SLF001 - aiomqtt has no hook for it

    def register(_paho: Any, _userdata: Any, sock: Any) -> None:
        def write() -> None:  # what aiomqtt's own callback does
            try:
                paho.loop_write()
            except Exception as error:  # noqa: BLE001 - a broken connection: aiomqtt's way to end it
                if not client._disconnected.done():  # noqa: SLF001
                    client._disconnected.set_exception(error)  # noqa: SLF001

        def add() -> None:
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile
                loop.add_writer(sock.fileno(), write)

        loop.call_soon_threadsafe(add)

    paho.on_socket_register_write = register


def set_connect_timeout(client: aiomqtt.Client, timeout_s: float) -> None:
    """Bound paho's TCP connect to ``timeout_s`` seconds (paho's own default is 5 s;
    aiomqtt does not pass its ``timeout`` on to it)."""
    client._client.connect_timeout = timeout_s  # noqa: SLF001 - aiomqtt does not pass it on


class FastPath:
    """The shortcuts for one connected ``client``. Create on the event loop thread after
    the connect; it routes received messages to ``on_message(topic, payload, retain)``.
    ``qos0_only``: the connection publishes only QoS 0, through `publish` (the data
    connection), so paho's per-write publish callback is switched off."""

    def __init__(
        self, client: aiomqtt.Client, on_message: OnMessage, *, qos0_only: bool = False
    ) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._direct = False
        inner = client._client  # noqa: SLF001 - aiomqtt's paho client
        self._inner = inner
        self._aiomqtt_register = inner.on_socket_register_write
        assert self._aiomqtt_register is not None  # aiomqtt drives paho from the loop

        def received(_client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
            try:
                on_message(message.topic, bytes(message.payload), bool(message.retain))
            except Exception:  # a bug in a handler must not take the connection down
                log.exception("handling a message on %s failed", message.topic)

        inner.on_message = received
        inner.on_socket_register_write = self._register_write
        if qos0_only:  # nothing waits for a QoS 0 confirmation: skip paho building one per write
            inner.on_publish = None

    def want_write(self) -> bool:
        """True while paho holds bytes of this connection the socket has not taken yet."""
        return bool(self._inner.want_write())

    def fileno(self) -> int | None:
        """The connection's socket file descriptor (None once it is closed)."""
        sock = self._inner.socket()
        return sock.fileno() if sock is not None else None

    def _register_write(self, paho_client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._direct:
            return  # `publish` writes at once and registers only what the socket left
        if threading.get_ident() != self._loop_thread:
            assert self._aiomqtt_register is not None
            self._aiomqtt_register(paho_client, userdata, sock)  # thread-safe, as aiomqtt does
            return
        self._loop.add_writer(sock.fileno(), self._write)

    def _write(self) -> None:
        try:
            self._inner.loop_write()
        except Exception as error:  # a broken socket: the connection is gone
            self._lost(error)

    def _lost(self, error: Exception) -> None:
        disconnected = self._client._disconnected  # noqa: SLF001 - what aiomqtt's callbacks set
        if not disconnected.done():
            disconnected.set_exception(error)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        """Publish ``payload`` at QoS 0 and write it to the socket before returning, as far
        as the socket takes it (the rest goes when it is writable). Raises BusError when
        paho refuses it (not connected); a socket error marks the connection lost (the
        reconnect loop takes over)."""
        inner = self._inner
        self._direct = True
        try:
            info = inner.publish(topic, payload, 0, retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise BusError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
            inner.loop_write()
        except BusError:
            raise
        except Exception as error:  # same handling as aiomqtt's write callback
            self._lost(error)
        finally:
            self._direct = False
        sock = inner.socket()
        if inner.want_write() and sock is not None:  # the socket did not take it all
            self._loop.add_writer(sock.fileno(), self._write)
