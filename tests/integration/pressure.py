"""Test helper for overload and slow-consumer tests: resident memory sampled from /proc
while a load runs, and an MQTT client that subscribes to its replies and then never reads
its socket again (a stalled consumer, as a crashed-but-connected phone would be)."""

from __future__ import annotations

import asyncio
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from services.cli.client import Client, ClientOptions
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import GenerateRequest
from shared.topics import FINISHED, REPLIES, REQUESTS


def rss_kb(pid: int) -> int:
    """VmRSS of process ``pid`` in KiB (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class RssSampler:
    """Samples the VmRSS of named processes every ``interval_s`` on a thread (not the
    event loop, whose stalls would hide peaks); ``peak`` and ``first`` in KiB."""

    pids: Mapping[str, int]
    interval_s: float = 0.005
    first: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                value = rss_kb(pid)
                self.first.setdefault(name, value)
                self.peak[name] = max(self.peak.get(name, 0), value)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _remaining_length(size: int) -> bytes:
    out = bytearray()
    while True:
        size, digit = divmod(size, 128)
        out.append(digit | (0x80 if size else 0))
        if not size:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


class StalledReader:
    """A raw MQTT 3.1.1 client that subscribes (QoS 1) to ``topic`` and then stops reading.

    Keepalive 0, so the broker never drops it for silence: the worst case, it stays
    connected while the broker queues for it (up to ``max_queued_messages``, mosquitto.conf).
    The socket's receive buffer is made small so the kernel holds little of it.
    """

    def __init__(self, broker_url: str, client_id: str, topic: str) -> None:
        parts = urlsplit(broker_url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client_id, self.topic = client_id, topic
        self.sock: socket.socket | None = None

    def connect(self, timeout_s: float = 10.0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(timeout_s)
        sock.connect(self.address)
        body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 0) + _utf8(self.client_id)
        sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        if self._read(sock, 4)[:1] != b"\x20":
            raise ConnectionError("no CONNACK")
        body = struct.pack("!H", 1) + _utf8(self.topic) + b"\x01"
        sock.sendall(b"\x82" + _remaining_length(len(body)) + body)
        suback = self._read(sock, 5)
        if suback[:1] != b"\x90" or suback[4] == 0x80:
            raise ConnectionError(f"subscription refused: {suback!r}")
        self.sock = sock  # from here on nothing reads it

    @staticmethod
    def _read(sock: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


async def requests_for(settings: BusSettings, entry: str, reply_to: str, prompts: list[list[int]],
                       tokens: int, streams: int, until: float, timeout_s: float = 60.0) -> int:  # fmt: skip
    """Keep ``streams`` generations running for ``reply_to`` (which may never read its
    replies) until loop time ``until``: each stream sends the next request when the
    entry's `requests/finished` copy of its previous one arrives. Returns how many
    finished. Raises TimeoutError when one is not finished within ``timeout_s``."""
    finished: dict[str, asyncio.Event] = {}
    done = 0
    async with Bus(settings) as bus, bus.subscribe(FINISHED) as feed:

        async def follow() -> None:
            async for _, message in feed:
                if message.request_id in finished:
                    finished[message.request_id].set()

        async def stream(index: int) -> None:
            nonlocal done
            serial = 0
            while asyncio.get_running_loop().time() < until:
                serial += 1
                rid = f"{reply_to}-{index}-{serial}"
                finished[rid] = asyncio.Event()
                prompt = prompts[(index + serial) % len(prompts)]
                await bus.publish(REQUESTS, GenerateRequest(
                    request_id=rid, reply_to=reply_to, token_ids=tuple(prompt),  # type: ignore[arg-type]
                    max_new_tokens=tokens, timeout_s=timeout_s), node=entry)  # fmt: skip
                async with asyncio.timeout(timeout_s):
                    await finished[rid].wait()
                done += 1

        follower = asyncio.create_task(follow())
        try:
            await asyncio.gather(*(stream(i) for i in range(streams)))
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
    return done


async def drain(settings: BusSettings, client: str, stop: asyncio.Event) -> int:
    """A consumer that reads every reply to ``client`` until ``stop``; returns the count."""
    count = 0
    async with Bus(settings) as bus, bus.subscribe(REPLIES, client=client) as replies:
        while not stop.is_set():
            try:
                async with asyncio.timeout(0.2):
                    await replies.get()
                count += 1
            except TimeoutError:
                continue
    return count


def reply_topic(settings: BusSettings, client: str) -> str:
    return REPLIES.topic(settings.cluster, client=client)


@dataclass
class ConsumerPhase:
    """One phase of the slow-consumer scenario: the other client's per-request time per
    output token (s, measured at the client from token arrivals), its wrong answers, the
    requests each side finished, and each process's VmRSS at the start and peak (KiB)."""

    tpots_s: list[float]
    wrong: int
    other_done: int
    slow_done: int
    first_kb: dict[str, int]
    peak_kb: dict[str, int]

    @property
    def median_tpot_s(self) -> float:
        return statistics.median(self.tpots_s)


async def _other_client(settings: BusSettings, prompts: Sequence[list[int]], tokens: int, until: float,
                        expected: Callable[[list[int]], Sequence[int]]) -> tuple[list[float], int]:  # fmt: skip
    """Requests one after another until loop time ``until``; (TPOTs, wrong answers)."""
    tpots, wrong, serial = [], 0, 0
    loop = asyncio.get_running_loop()
    async with Client(options=ClientOptions(settings, timeout_s=60.0)) as client:
        while loop.time() < until:
            prompt = prompts[serial % len(prompts)]
            serial += 1
            stream = client.generate(prompt, max_new_tokens=tokens)
            arrivals = [time.monotonic() async for _ in stream]
            assert stream.result is not None
            wrong += tuple(stream.result.token_ids) != tuple(expected(prompt))
            tpots.append((arrivals[-1] - arrivals[0]) / max(1, len(arrivals) - 1))
    return tpots, wrong


async def consumer_phase(settings: BusSettings, entry: str, pids: Mapping[str, int], *, reads: bool,
                         seconds: float, prompts: Sequence[list[int]], tokens: int,
                         expected: Callable[[list[int]], Sequence[int]], streams: int = 4) -> ConsumerPhase:  # fmt: skip
    """``streams`` generations at a time for a consumer that reads its replies
    (``reads``) or one that subscribed and stopped reading (`StalledReader`), beside
    one ordinary client; the VmRSS of ``pids`` sampled throughout."""
    consumer = "reader" if reads else "stalled"
    stop = asyncio.Event()
    stalled = None
    draining = None
    if reads:
        draining = asyncio.create_task(drain(settings, consumer, stop))
    else:
        stalled = StalledReader(settings.broker_url, f"{settings.cluster}-stalled-raw", reply_topic(settings, consumer))
        await asyncio.to_thread(stalled.connect)
    until = asyncio.get_running_loop().time() + seconds
    try:
        with RssSampler(pids) as sampler:
            slow_done, (tpots, wrong) = await asyncio.gather(
                requests_for(settings, entry, consumer, list(prompts), tokens, streams, until),
                _other_client(settings, prompts, tokens, until, expected),
            )  # fmt: skip
    finally:
        stop.set()
        if draining is not None:
            await draining
        if stalled is not None:
            stalled.close()
    return ConsumerPhase(tpots, wrong, len(tpots), slow_done, dict(sampler.first), dict(sampler.peak))
