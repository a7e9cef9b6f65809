"""The worker's single compute thread: every forward runs there, never on the event loop.

A job crosses from the loop to the thread through a `queue.SimpleQueue` and comes back
with one ``call_soon_threadsafe``. That is lighter than ``loop.run_in_executor`` (no
executor work item, no concurrent future chained to an asyncio one): measured on a
2-core node with the loop idle 20 ms between jobs, 133 µs against 221 µs per round trip
(docs/PERFORMANCE.md), and a decode step makes one such round trip per node.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from shared.errors import EdgesplitError, Overloaded

log = logging.getLogger(__name__)
T = TypeVar("T")

_Job = tuple[
    asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[object, ...]
]


class ComputeClosed(EdgesplitError):
    """A job was submitted after `ComputeThread.close`."""


class ComputeBusy(Overloaded):
    """The compute thread's queue is full: the job is refused, not queued."""


COMPUTE_QUEUE = 256
"""Jobs a compute thread holds at most (queued and running): each request in flight has
at most one pass on a node at a time, so this is far above a healthy load."""


class ComputeThread:
    """One thread for all of a worker's compute, so forwards never overlap and the event
    loop never blocks. ``threads`` sets torch's intra-op threads for that thread. At most
    ``max_pending`` jobs wait or run; more are refused with ComputeBusy (counted in
    ``refused``): a frame is then dropped (its pass times out and the entry replays), an
    entry's own request fails as ``overloaded``."""

    def __init__(self, threads: int = 1, max_pending: int = COMPUTE_QUEUE) -> None:
        self._threads = threads
        self.max_pending = max_pending
        self.refused = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self.pending = 0
        """Jobs submitted and not finished (the one running included); event loop only."""
        self._busy_s = 0.0
        self._running_since: float | None = None
        self._busy_lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name="compute", daemon=True)
        self._thread.start()

    async def run(self, function: Callable[..., T], *args: object) -> T:
        """Run ``function(*args)`` on the compute thread; its result or its exception.
        Cancelling the caller does not stop a job that already started."""
        if self._closed:
            raise ComputeClosed("the compute thread is closed")
        if self.pending >= self.max_pending:
            self.refused += 1
            raise ComputeBusy(f"the compute queue is full ({self.max_pending} jobs); job refused")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.pending += 1
        try:
            self._jobs.put((loop, future, function, args))
            return await future
        finally:
            self.pending -= 1

    def _main(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, future, function, args = job
            if future.cancelled():  # the caller gave up before the job started
                continue
            try:
                result = self._timed(function, *args)
            except BaseException as error:  # noqa: BLE001 - handed to the caller, not swallowed
                _deliver(loop, future, None, error)
            else:
                _deliver(loop, future, result, None)

    def _timed(self, function: Callable[..., T], *args: object) -> T:
        began = time.perf_counter()
        with self._busy_lock:
            self._running_since = began
        try:
            return function(*args)
        finally:
            with self._busy_lock:
                self._busy_s += time.perf_counter() - began
                self._running_since = None

    def busy_s(self) -> float:
        """Seconds the compute thread has spent in jobs so far (the running one included)."""
        with self._busy_lock:
            running = self._running_since
            return self._busy_s + (time.perf_counter() - running if running is not None else 0.0)

    def close(self) -> None:
        """Stop taking jobs; the thread ends after the job it runs. Queued jobs do not
        run: their callers get ComputeClosed."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _deliver(job[0], job[1], None, ComputeClosed("the compute thread closed first"))
        self._jobs.put(None)


def _deliver(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: object,
    error: BaseException | None,
) -> None:
    def settle() -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody waits any more
        log.debug("compute result dropped: the event loop is closed")
