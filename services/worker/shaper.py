"""Egress shaping per destination: a token bucket for bandwidth plus added latency.

This is *emulation*: on one machine every worker talks to the broker over loopback, so
each worker delays its own outgoing activation frames as if they crossed the link that
the topology (or a run-time emulation command) describes. The decision of when a frame
may leave is a pure function of the link's shape, the frame size and the time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shared.errors import EdgesplitError

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class LinkShape:
    """An emulated link: bandwidth in bytes/s (None = unshaped) and one-way latency in s."""

    bandwidth_bytes_per_s: float | None = None
    latency_s: float = 0.0


@dataclass(slots=True)
class _Bucket:
    shape: LinkShape
    busy_until_s: float = 0.0


@dataclass
class EgressSchedule:
    """Pure bookkeeping: when may a frame of n bytes to `destination` be delivered?"""

    default: LinkShape = field(default_factory=LinkShape)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def set_shape(self, destination: str, shape: LinkShape) -> None:
        bucket = self._buckets.get(destination)
        if bucket is None:
            self._buckets[destination] = _Bucket(shape)
        else:
            bucket.shape = shape

    def shape(self, destination: str) -> LinkShape:
        bucket = self._buckets.get(destination)
        return bucket.shape if bucket else self.default

    def backlogged(self, destination: str, now_s: float) -> bool:
        """True while an earlier frame still occupies the link to ``destination``."""
        bucket = self._buckets.get(destination)
        return bucket is not None and bucket.busy_until_s > now_s

    def wait_s(self, destination: str, now_s: float) -> float:
        """How long a frame queued now would wait for earlier frames to leave the link."""
        bucket = self._buckets.get(destination)
        return max(0.0, bucket.busy_until_s - now_s) if bucket is not None else 0.0

    def release_time(self, destination: str, nbytes: int, now_s: float) -> float:
        """Absolute time at which the frame arrives: serialisation behind earlier frames
        at the link's bandwidth, then the link's latency. Updates the bucket."""
        bucket = self._buckets.setdefault(destination, _Bucket(self.default))
        shape = bucket.shape
        start = max(bucket.busy_until_s, now_s)
        transmit_s = nbytes / shape.bandwidth_bytes_per_s if shape.bandwidth_bytes_per_s else 0.0
        bucket.busy_until_s = start + transmit_s
        return bucket.busy_until_s + shape.latency_s


SHAPER_QUEUE = 1024
"""Frames a shaped link holds at most, per destination."""


class EgressShaper:
    """Sends frames through `send` after the delay the schedule gives, in order per destination.

    Unshaped destinations are sent at once, with no task hop. A shaped destination holds
    at most ``max_queued`` frames; a frame past that is dropped (a full router queue's
    tail drop: its pass times out and the entry replays) and counted in ``dropped``.
    """

    def __init__(
        self,
        send: Callable[[str, bytes], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        max_queued: int = SHAPER_QUEUE,
    ) -> None:
        self._send = send
        self._clock = clock
        self.max_queued = max_queued
        self.dropped = 0
        self.schedule = EgressSchedule()
        self._queues: dict[str, asyncio.Queue[tuple[float, bytes, bool]]] = {}
        self._delivered: dict[str, tuple[int, float]] = {}
        """destination -> (bytes, seconds) sent while the link was backlogged, this window."""
        self._last_sent_s: dict[str, float] = {}
        self._task_group: asyncio.TaskGroup | None = None
        self.unsent = 0
        """Shaped frames the bus could not publish (broker away); their passes time out."""

    async def run(self) -> None:
        """Own the per-destination sender tasks until cancelled."""
        async with asyncio.TaskGroup() as task_group:
            self._task_group = task_group
            try:
                await asyncio.Event().wait()
            finally:
                self._task_group = None

    async def send(self, destination: str, frame: bytes) -> None:
        shape = self.schedule.shape(destination)
        if shape.bandwidth_bytes_per_s is None and shape.latency_s == 0.0:
            await self._send(destination, frame)
            return
        queue = self._queues.get(destination)
        if queue is not None and queue.qsize() >= self.max_queued:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("egress to %s full (%d frames): %d dropped so far", destination,
                            self.max_queued, self.dropped)  # fmt: skip
            return
        now_s = self._clock()
        behind = self.schedule.backlogged(destination, now_s)
        release_s = self.schedule.release_time(destination, len(frame), now_s)
        if queue is None:
            if self._task_group is None:
                raise RuntimeError("EgressShaper.run() is not running")
            queue = asyncio.Queue()
            self._queues[destination] = queue
            self._task_group.create_task(self._drain(destination, queue))
        queue.put_nowait((release_s, frame, behind))

    def queue_wait_s(self, destination: str) -> float:
        """How long a frame sent to ``destination`` now would wait behind earlier ones."""
        return self.schedule.wait_s(destination, self._clock())

    def delivery_rates(self) -> dict[str, float]:
        """Bytes/s each link delivered while backlogged since the last call (then reset):
        a frame that waited behind another left ``bytes / (its send - the previous send)``
        after it, the link's own rate (a sender's delivery-rate estimate, as TCP's BBR
        takes it). Links that never queued in the window are absent."""
        rates = {dst: nbytes / seconds for dst, (nbytes, seconds) in self._delivered.items() if seconds > 0}
        self._delivered.clear()
        return rates

    async def _drain(self, destination: str, queue: asyncio.Queue[tuple[float, bytes, bool]]) -> None:
        while True:
            release_s, frame, behind = await queue.get()
            delay_s = release_s - self._clock()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            sent_s, previous_s = self._clock(), self._last_sent_s.get(destination)
            self._last_sent_s[destination] = sent_s
            if behind and previous_s is not None and sent_s > previous_s:
                nbytes, seconds = self._delivered.get(destination, (0, 0.0))
                self._delivered[destination] = (nbytes + len(frame), seconds + sent_s - previous_s)
            try:
                await self._send(destination, frame)
            except EdgesplitError as error:  # a lost frame, as on a real link: the entry replays
                self.unsent += 1
                log.warning("frame to %s not sent: %s", destination, error)
