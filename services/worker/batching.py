"""Continuous batching of decode steps on a worker's compute thread.

Each decode step (one new token of one request) that reaches a stage is queued under
its (epoch, segment); when no job of that key is submitted or running, it submits one. The job takes every step queued under the key when it starts and runs them as ONE
batched forward (`SegmentHost.forward_batch`: the linear layers and MLP on the stacked
rows, attention per request against its own KV cache); steps queued while it runs wait
for its end, and the next job is submitted then, a turn after the finished batch's
requests woke (`_job_done`), so they and the steps that came meanwhile run together.
The batch size is bounded by the steps in flight (the entry's admitted requests;
COMPUTE_QUEUE decode frames per worker). A batch is therefore exactly what was waiting
when the compute thread became free for it (plus the steps that became ready in the
same turn of the event loop): no step waits for a batch to fill, and a request joins or
leaves between any two steps.

Prefill (more than one token, or position 0) never comes here: a prompt of T tokens is
already a [T, H] matrix product, compute-bound, and stacking it with decode rows would
only make those decodes wait for it (`DataPlane._on_activation` runs it alone).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from services.worker.compute import ComputeThread, DecodeStep, SegmentHost, Slowdown
from shared.errors import EdgesplitError
from shared.frame_headers import ActivationHeader, FrameHeader


def is_decode_step(header: FrameHeader, rows: int) -> bool:
    """True for an activation of one token (``rows``) past position 0: a decode step,
    which may run batched with other requests' (prefill, position 0 or several rows,
    runs alone)."""
    return isinstance(header, ActivationHeader) and header.pos > 0 and rows == 1


BatchKey = tuple[int, SegmentHost]
"""(epoch, segment host): steps batch only with steps of the same epoch and segment."""

class SampleHead(Protocol):
    """The entry's pending sampling at the start of a decode step (entry.py `NextToken`)."""

    def head_input(self) -> np.ndarray | None: ...
    def __call__(self, logits: torch.Tensor | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class Head:
    """A step's head to run first, batched: ``logits`` maps stacked [R, H] final hidden
    states to [R, V] (the entry's head); ``rows`` are this step's (None: nothing to run)."""

    logits: Callable[[np.ndarray], torch.Tensor]
    rows: np.ndarray | None


@dataclass(eq=False)
class _Waiting:
    """A queued decode step. ``rows`` runs on the compute thread and gives its [1, H]
    input from the logits of ``head`` (None without one): the entry samples the previous
    token and embeds it there. Its errors are that request's alone."""

    request_id: str
    position: int
    rows: Callable[[torch.Tensor | None], np.ndarray]
    head: Head | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()


class DecodeBatcher:
    """Batches the decode steps of one worker (all its epochs and segments).

    ``counters`` (the data plane's) gets ``decode_batches`` (batched forwards of two or
    more requests) and ``decode_batched_rows`` (the requests they carried)."""

    def __init__(self, compute: ComputeThread, slowdown: Slowdown, counters: Counter[str]) -> None:
        self.compute = compute
        self.slowdown = slowdown
        self.counters = counters
        self._queued: dict[BatchKey, list[_Waiting]] = {}
        self._active: set[BatchKey] = set()  # keys with a job submitted, running or ending
        self._lock = threading.Lock()  # the loop queues, the compute thread takes
        self._jobs: set[asyncio.Future[None]] = set()  # submitted jobs, referenced until done

    async def forward(
        self, key: BatchKey, request_id: str, position: int,
        rows: Callable[[torch.Tensor | None], np.ndarray], head: Head | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Run one request's decode step at ``position`` through ``key``'s segment, in a
        batch with whatever else is queued for it; its [1, H] output. ``head``: the entry's
        head on the previous pass's state, run for the whole batch in one call first, its
        logits handed to ``rows``. Raises what the step raises for this request
        (KvMissing, KvOverBudget, an error of ``rows``) or what fails the whole batch;
        ComputeBusy when the compute queue is full."""
        waiting = _Waiting(request_id, position, rows, head, asyncio.get_running_loop())
        with self._lock:
            self._queued.setdefault(key, []).append(waiting)
            start = key not in self._active
            self._active.add(key)
        try:
            if start:  # no job of this key is on its way or running: submit one
                await self._submit(key)
            # each step waits for its own result, not for a job: a step another job took
            # goes on as soon as that batch ends (waiting for its own job, queued behind
            # other requests' steps, held requests apart and batches never formed)
            return await waiting.future
        finally:
            with self._lock:
                queued = self._queued.get(key)
                if queued is not None and waiting in queued:  # cancelled before it ran
                    queued.remove(waiting)
                if queued == [] and key not in self._active:
                    del self._queued[key]  # no entry keeps an old epoch's segment host

    async def _submit(self, key: BatchKey) -> None:
        """Submit the job that runs ``key``'s queued steps, after one turn of the event
        loop (the steps that became ready in the same turn, e.g. the entry's requests woken
        by one batch's results, queue first instead of the job starting alone on an idle
        thread). Called by the first step of an idle key, or by `_job_done` when steps
        queued while the key's job ran. A submitting step then waits for its own result like every other step,
        not for the job: the job's end comes back in a callback after its results, so a
        step waiting for it woke a turn after the rest of its batch and its frame left
        alone (batch_frames.py). The job is submitted even when this step is cancelled
        meanwhile (the others of its batch wait for it); when the compute thread refuses
        it, every step queued under the key fails so (`_job_done`)."""
        try:
            await asyncio.sleep(0)
        finally:
            job = asyncio.ensure_future(self.compute.run(self._run_queued, key))
            self._jobs.add(job)
            job.add_done_callback(lambda done: self._job_done(key, done))

    def _job_done(self, key: BatchKey, job: asyncio.Future[None]) -> None:
        """Event loop, after ``key``'s job has ended and its steps' results were handed
        out (their callback comes first): submit the next job for the steps queued
        meanwhile. Not earlier: a job submitted while another of its key runs starts the
        moment that one ends, before the finished batch's requests could queue their next
        steps, so a request that queued late ran alone and the batch stayed split in two
        for good (a single-stage entry with 8 streams ran batches of 1 and 7 in turn, at
        1.6 x the TPOT of one batch of 8). Submitting from here, a turn after those
        requests woke, takes them and the late one together. When the compute thread
        refused the job (ComputeBusy, ComputeClosed: nothing ran), every step still
        queued under the key fails so; when the job was cancelled (the loop is shutting
        down), they are cancelled."""
        self._jobs.discard(job)
        cancelled = job.cancelled()
        refused = not cancelled and isinstance(job.exception(), EdgesplitError)
        with self._lock:
            failed = self._queued.pop(key, []) if refused or cancelled else []
            again = bool(self._queued.get(key))
            if not again:
                self._active.discard(key)
                self._queued.pop(key, None)
        for waiting in failed:
            if waiting.future.done():
                continue
            if cancelled:
                waiting.future.cancel()
            else:
                waiting.future.set_exception(job.exception())  # type: ignore[arg-type]
        if again:
            submit = asyncio.ensure_future(self._submit(key))
            self._jobs.add(submit)
            submit.add_done_callback(self._jobs.discard)

    def _run_queued(self, key: BatchKey) -> None:
        """Compute thread: one batched forward of the steps queued under ``key`` now. Every
        step's result (or error) is handed to the loop in ONE callback, so the steps of a
        batch wake in the same turn and their frames leave together (batch_frames.py)."""
        with self._lock:  # a step queued from now on waits for the next job (`_job_done`)
            taken = self._queued.pop(key, [])
        taken = [waiting for waiting in taken if not waiting.future.cancelled()]
        settled: list[_Settled] = []
        try:
            self._forward(key[1], taken, settled)
        except Exception as error:  # noqa: BLE001 - a fault outside any one step's: every
            answered = {id(item[0]) for item in settled}  # step not yet answered gets it
            settled.extend((waiting, None, error) for waiting in taken if id(waiting) not in answered)
        finally:
            _settle(settled)

    def _forward(self, host: SegmentHost, taken: list[_Waiting], settled: list[_Settled]) -> None:
        """The batched forward of ``taken`` on ``host``; each step's outcome into ``settled``."""
        logits = _heads(taken)
        steps: list[DecodeStep] = []
        joined: list[_Waiting] = []
        for waiting in taken:
            try:
                if isinstance(logits.get(waiting), BaseException):
                    raise logits[waiting]  # type: ignore[misc]
                steps.append(DecodeStep(waiting.request_id, waiting.rows(logits.get(waiting)), waiting.position))  # type: ignore[arg-type]
            except BaseException as error:  # noqa: BLE001 - that request's error, handed to it
                settled.append((waiting, None, error))
            else:
                joined.append(waiting)
        if not steps:
            return
        try:
            results = host.forward_batch(steps, self.slowdown)
        except BaseException as error:  # noqa: BLE001 - every request of the batch gets it
            settled.extend((waiting, None, error) for waiting in joined)
            return
        ran = sum(1 for result in results if not isinstance(result, BaseException))
        if ran > 1:
            self.counters["decode_batches"] += 1
            self.counters["decode_batched_rows"] += ran
        for waiting, result in zip(joined, results, strict=True):
            if isinstance(result, BaseException):
                settled.append((waiting, None, result))
            else:
                settled.append((waiting, result, None))


def _heads(taken: list[_Waiting]) -> dict[_Waiting, torch.Tensor | BaseException]:
    """The logits of every step with a head to run, one head call per head function on
    its steps' stacked rows (the head is the costliest single layer of a small model:
    SmolLM2's is 49152 x 576). A failed call is the error of each of its steps."""
    groups: dict[Callable[[np.ndarray], torch.Tensor], list[_Waiting]] = {}
    for waiting in taken:
        if waiting.head is not None and waiting.head.rows is not None:
            groups.setdefault(waiting.head.logits, []).append(waiting)
    found: dict[_Waiting, torch.Tensor | BaseException] = {}
    for head, group in groups.items():
        try:
            logits = head(np.concatenate([w.head.rows for w in group]))  # type: ignore[union-attr, misc]
        except BaseException as error:  # noqa: BLE001 - handed to each step of the group
            found.update({waiting: error for waiting in group})
            continue
        offset = 0
        for waiting in group:
            count = waiting.head.rows.shape[0]  # type: ignore[union-attr]
            found[waiting] = logits[offset : offset + count]
            offset += count
    return found


_Settled = tuple[_Waiting, np.ndarray | None, BaseException | None]
"""A step, and its result or its error."""


def _settle(settled: list[_Settled]) -> None:
    """Hand each step its result (or error), from the compute thread: one callback per
    event loop for the whole batch, so its steps wake together."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Settled]] = {}
    for item in settled:
        by_loop.setdefault(item[0].loop, []).append(item)

    def settle(items: list[_Settled]) -> None:
        for waiting, result, error in items:
            if waiting.future.done():  # cancelled meanwhile
                continue
            if error is not None:
                waiting.future.set_exception(error)
            else:
                waiting.future.set_result(result)  # type: ignore[arg-type]

    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(settle, items)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass
