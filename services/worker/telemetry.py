"""Worker telemetry: one `Telemetry` message on the control connection per period.

It reports CPU use, process memory, memory the OS could still give, compute-thread
busy time and queue depth, requests in flight, KV-cache bytes, the segment held, the
per-block compute time measured from real forwards (prefill and decode apart, smoothed)
and the link observations of the prober. A short microbenchmark on the compute thread
at start-up (one real block of the model) gives a fresh node its numbers before its
first request. The message doubles as the heartbeat the monitor times out on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared.errors import EdgesplitError
from shared.messages import BlockTimes, LinkObservation, Telemetry
from shared.model.benchmark import benchmark_batch_scaling, benchmark_block
from shared.topics import TELEMETRY

if TYPE_CHECKING:
    from services.worker.compute_thread import ComputeThread
    from services.worker.epochs import Serving
    from shared.bus import Bus
    from shared.model.shard import ShardStore

log = logging.getLogger(__name__)



MAX_FORWARDS_PER_WINDOW = 4096
MAX_BATCH_SCALING = 2.0
SCALING_WINDOWS = 5
"""The batch scaling reported is the median of the last this many windows' estimates."""
"""A batched decode measured slower than this (per extra request, relative to one alone)
is clipped: a noisy single-step value, not a property of the node."""


@dataclass
class _WindowedTime:
    """Per-block times of one kind of forward: the samples of the current telemetry
    window, and the value of the last window that had any (None before the first)."""

    value: float | None = None
    samples: list[float] = field(default_factory=list)

    def add(self, sample: float) -> None:
        if len(self.samples) < MAX_FORWARDS_PER_WINDOW:
            self.samples.append(sample)

    def close(self) -> int:
        """End the window: its median becomes the value; returns its sample count."""
        count = len(self.samples)
        if count:
            self.value = statistics.median(self.samples)
            self.samples = []
        return count


class BlockTimer:
    """Per-block compute times of forwards, prefill and decode apart, smoothed: each
    telemetry window reports the median of its forwards' times (a window without
    forwards keeps the previous value; the monitor takes the median of 3 windows).

    A batched decode step of B requests counts for the decode time too, scaled back to
    one request by the node's batch scaling (``t / (1 + scaling x (B - 1))``): on a busy
    node nearly every step is batched, and a node slowed under load must show it. The
    scaling itself is measured only against lone steps of the same window (against an
    older single-step value a slowdown would pass for worse scaling and hide itself);
    the start-up benchmark seeds it.

    The times are compute-thread CPU seconds plus the emulated slowdown
    (`compute_clock`), not wall time: on a shared machine a forward's wall time also
    holds the time it waited for a core or the GIL, which grows with load, not with the
    node's speed. Thread-safe: the compute thread records, the event loop reads a window."""

    def __init__(self) -> None:
        self._decode = _WindowedTime()
        self._prefill = _WindowedTime()
        self._scaling: float | None = None
        self._scalings: deque[float] = deque(maxlen=SCALING_WINDOWS)  # the last windows' estimates
        self._batched: list[tuple[float, int]] = []  # (seconds per block, requests) this window
        self._measured = False
        self._lock = threading.Lock()

    def record(self, tokens: int, blocks: int, seconds: float, batch: int = 1) -> None:
        """One forward of ``tokens`` tokens through ``blocks`` blocks that took ``seconds``;
        ``batch`` > 1: a batched decode step of that many requests (one token each), which
        is not a prefill: see the class."""
        if tokens <= 0 or blocks <= 0 or seconds < 0 or batch <= 0:
            return
        with self._lock:
            self._measured = True
            if batch > 1:
                if len(self._batched) < MAX_FORWARDS_PER_WINDOW:
                    self._batched.append((seconds / blocks, batch))
            elif tokens == 1:
                self._decode.add(seconds / blocks)
            else:
                self._prefill.add(seconds / blocks / tokens)

    def calibrate(
        self, decode_s_per_block: float, prefill_s_per_block_token: float, batch_scaling: float | None = None
    ) -> None:
        """Seed the values from the start-up benchmark (real forwards then take over)."""
        with self._lock:
            if self._decode.value is None:
                self._decode.value = decode_s_per_block
            if self._prefill.value is None:
                self._prefill.value = prefill_s_per_block_token
            if self._scaling is None and batch_scaling is not None:
                self._scaling = min(MAX_BATCH_SCALING, batch_scaling)

    def decode_s_per_block(self) -> float | None:
        """The current decode time per block (None: not measured yet); starts no window."""
        with self._lock:
            return self._decode.value

    def _close_batched(self) -> int:
        """Fold this window's batched steps in: the scaling from the window's lone steps
        (or, never measured before, from the previous single-step value), then each batched
        step as the single step it implies. Lock held."""
        batched, self._batched = self._batched, []
        lone = self._decode.samples
        single = statistics.median(lone) if lone else (self._decode.value if self._scaling is None else None)
        if batched and single:
            ratios = [(seconds / single - 1.0) / (batch - 1) for seconds, batch in batched]
            self._scalings.append(min(MAX_BATCH_SCALING, max(0.0, statistics.median(ratios))))
            self._scaling = statistics.median(self._scalings)  # windows with few lone steps are noisy
        if self._scaling is not None:
            for seconds, batch in batched:
                self._decode.add(seconds / (1.0 + self._scaling * (batch - 1)))
        return len(batched)

    def window(self) -> BlockTimes | None:
        """The values as of this window and the forwards measured in it (starts the next)."""
        with self._lock:
            lone = len(self._decode.samples)
            batched_samples = self._close_batched()
            self._decode.close()
            prefill_samples = self._prefill.close()
            if self._decode.value is None and self._prefill.value is None:
                return None
            return BlockTimes(
                decode_s_per_block=self._decode.value,
                prefill_s_per_block_token=self._prefill.value,
                decode_samples=lone,
                prefill_samples=prefill_samples,
                source="forwards" if self._measured else "benchmark",
                decode_batch_scaling=self._scaling,
                batched_samples=batched_samples,
            )


def read_memory() -> tuple[int, int | None]:
    """(resident bytes of this process, bytes the OS could still give or None)."""
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * page
    except (OSError, ValueError, IndexError):
        import resource

        resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return resident, available


@dataclass(frozen=True)
class TelemetrySources:
    """What a worker's telemetry reports, read afresh at every sample.

    ``compute``: the compute thread (busy seconds, queue depth; it also runs the start-up
    benchmark). ``serving``: the committed epoch's state (route, segment host, entry) or
    None before the first plan. ``links``: the prober's observations since the last call.
    """

    node: str
    period_s: float
    """Seconds between two telemetry messages."""
    compute: ComputeThread
    serving: Callable[[], Serving | None]
    links: Callable[[], tuple[LinkObservation, ...]]
    frames_forged: Callable[[], int] = lambda: 0
    """Frames the data plane dropped as forged since start (services/worker/frame_auth.py)."""
    decode_batches: Callable[[], tuple[int, int]] = lambda: (0, 0)
    """(batched forwards of two or more decode steps, steps they carried) since start
    (services/worker/batching.py)."""
    batched_frames: Callable[[], tuple[int, int]] = lambda: (0, 0)
    """(batch frames sent, decode steps they carried) since start (services/worker/batch_frames.py)."""
    overflows: Callable[[], int] | None = None
    """Items the node's bounded queues refused or dropped so far."""
    news: asyncio.Event | None = None
    """Set by the prober when a link fell (or its round trip rose): the window is sent at
    once, not at the end of the period, so the monitor plans around it sooner."""


@dataclass(frozen=True)
class StartupBenchmark:
    """One real block of ``store``'s model, timed on the compute thread at start-up;
    ``slowdown_factor`` scales it like real forwards (emulated slowdown)."""

    store: ShardStore
    slowdown_factor: float
    device: str = "cpu"


NEWS_SPACING_S = 0.2
"""Telemetry is never sent more often than this, news or not."""


class TelemetryReporter:
    """Publishes the worker's telemetry every ``sources.period_s`` seconds."""

    def __init__(self, sources: TelemetrySources) -> None:
        self.sources = sources
        self.timer = BlockTimer()
        self.published = 0
        self._last_wall_s = time.monotonic()
        self._last_cpu_s = time.process_time()
        self._last_busy_s = 0.0
        self.latest: Telemetry | None = None
        """The newest sample (its metrics)."""

    async def run(self, bus: Bus, benchmark: StartupBenchmark | None = None) -> None:
        """Calibrate with ``benchmark`` (on the compute thread; None skips it) and publish
        until cancelled. A publish the broker does not take is logged and retried at the
        next period."""
        node = self.sources.node
        async with asyncio.TaskGroup() as task_group:
            if benchmark is not None:
                task_group.create_task(self._calibrate(benchmark), name="calibrate")
            while True:
                if self.sources.news is not None:
                    self.sources.news.clear()  # what it announced is in this window
                try:
                    await bus.publish(TELEMETRY, self.sample(), node=node)
                    self.published += 1
                except EdgesplitError as error:  # the broker is away: the next one retries
                    log.info("%s: telemetry not published: %s", node, error)
                await self._wait_period()

    async def _wait_period(self) -> None:
        """One period, or less when the prober has news (at least NEWS_SPACING_S apart)."""
        news, period_s = self.sources.news, self.sources.period_s
        if news is None:
            await asyncio.sleep(period_s)
            return
        await asyncio.sleep(min(NEWS_SPACING_S, period_s))
        try:
            async with asyncio.timeout(max(0.0, period_s - NEWS_SPACING_S)):
                await news.wait()
        except TimeoutError:
            pass

    async def _calibrate(self, benchmark: StartupBenchmark) -> None:
        node = self.sources.node
        try:
            decode_s, prefill_s = await self.sources.compute.run(
                benchmark_block, benchmark.store, benchmark.slowdown_factor, benchmark.device
            )
            scaling = await self.sources.compute.run(benchmark_batch_scaling, benchmark.store, benchmark.device)
        except Exception as error:  # a node without numbers still serves
            log.warning("%s: start-up benchmark failed: %s", node, error)
            return
        self.timer.calibrate(decode_s, prefill_s, scaling)
        log.info("%s: benchmark: decode %.3f ms/block, prefill %.3f ms/block-token, batch scaling %s",
                 node, decode_s * 1e3, prefill_s * 1e3, "-" if scaling is None else f"{scaling:.2f}")  # fmt: skip

    def sample(self) -> Telemetry:
        """The telemetry of the window since the previous sample (resets the window)."""
        sources = self.sources
        compute = sources.compute
        now_s, cpu_s, busy_s = time.monotonic(), time.process_time(), compute.busy_s()
        window_s = max(1e-3, now_s - self._last_wall_s)
        cpu = (cpu_s - self._last_cpu_s) / window_s / (os.cpu_count() or 1)
        busy = (busy_s - self._last_busy_s) / window_s
        self._last_wall_s, self._last_cpu_s, self._last_busy_s = now_s, cpu_s, busy_s
        resident, available = read_memory()
        serving = sources.serving()
        host = serving.host if serving else None
        entry = serving.entry if serving else None
        in_flight = len(entry.journal) if entry is not None else (host.requests() if host else 0)
        times = self.timer.window()
        batches, batched_steps = sources.decode_batches()
        frames_sent, frame_rows = sources.batched_frames()
        self.latest = Telemetry(
            node=sources.node,  # type: ignore[arg-type]
            window_s=window_s,
            cpu_utilisation=min(1.0, max(0.0, cpu)),
            memory_used_bytes=resident,
            requests_in_flight=in_flight,
            requests_queued=len(entry.waiting) if entry is not None else 0,
            ms_per_layer=times.decode_s_per_block * 1e3 if times and times.decode_s_per_block else None,
            epoch=serving.epoch if serving else None,
            memory_available_bytes=available,
            compute_busy=min(1.0, max(0.0, busy)),
            queue_depth=max(0, compute.pending - 1),
            kv_cache_bytes=host.kv_bytes() if host else 0,
            segments_held=1 if host else 0,
            blocks_held=host.end - host.start if host else 0,
            block_times=times,
            links=sources.links(),
            frames_forged=sources.frames_forged(),
            decode_batches=batches,
            decode_batched_steps=batched_steps,
            batched_frames_sent=frames_sent,
            batched_frames_rows=frame_rows,
            queue_overflows=sources.overflows() if sources.overflows else 0,
        )
        return self.latest
