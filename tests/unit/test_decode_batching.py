"""Continuous batching on a worker's compute thread (services/worker/batching.py): decode
steps queued while the thread is busy run as one batched forward, equal to one forward
per request; one request's error stays that request's."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from services.worker.batching import DecodeBatcher, Head
from services.worker.compute import ComputeThread, KvMissing, SegmentHost, Slowdown
from services.worker.compute_thread import ComputeBusy
from shared.model.checkpoint import Checkpoint
from shared.model.tiny import write_tiny_checkpoint

PROMPT_LENGTHS = [3, 7, 1, 5]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("llama", tmp_path_factory.mktemp("batching") / "llama", layers=4, seed=5)


def _prefilled(model: Path) -> SegmentHost:
    host = SegmentHost(Checkpoint(model), 1, 3)
    generator = np.random.default_rng(0)
    for number, length in enumerate(PROMPT_LENGTHS):
        prompt = generator.standard_normal((length, 64)).astype(np.float32)
        host.forward(f"r{number}", prompt, 0, Slowdown())
    return host


def _rows(count: int) -> list[np.ndarray]:
    generator = np.random.default_rng(1)
    return [generator.standard_normal((1, 64)).astype(np.float32) for _ in range(count)]


async def _while_busy(compute: ComputeThread) -> tuple[threading.Event, asyncio.Future[None]]:
    """Occupy the compute thread until the returned event is set; the future is that job."""
    release, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    held = asyncio.ensure_future(compute.run(hold))
    await asyncio.to_thread(started.wait, 30)
    return release, held


def test_steps_queued_while_busy_run_as_one_batch_equal_to_one_forward_each(model: Path) -> None:
    torch.set_num_threads(1)
    batched_host, reference_host = _prefilled(model), _prefilled(model)
    rows = _rows(len(PROMPT_LENGTHS))
    counters: Counter[str] = Counter()

    async def scenario() -> list[np.ndarray]:
        compute = ComputeThread()
        batcher = DecodeBatcher(compute, Slowdown(), counters)
        try:
            release, held = await _while_busy(compute)
            async with asyncio.timeout(30):
                steps = [
                    asyncio.ensure_future(batcher.forward((1, batched_host), f"r{n}", PROMPT_LENGTHS[n],
                                                          lambda _, row=row: row))  # fmt: skip
                    for n, row in enumerate(rows)
                ]
                await asyncio.sleep(0.05)  # every step queued behind the busy thread
                release.set()
                await held
                return list(await asyncio.gather(*steps))
        finally:
            compute.close()

    outputs = asyncio.run(scenario())
    assert (counters["decode_batches"], counters["decode_batched_rows"]) == (1, 4)
    for number, (row, output) in enumerate(zip(rows, outputs, strict=True)):
        expected = reference_host.forward(f"r{number}", row, PROMPT_LENGTHS[number], Slowdown())
        np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    assert batched_host.kv_bytes() == reference_host.kv_bytes()


def test_one_requests_error_does_not_fail_its_batch(model: Path) -> None:
    """A step at the wrong position (its KV cache is elsewhere) gets KvMissing, a step
    whose input cannot be made gets its own error; the rest run, batched."""
    torch.set_num_threads(1)
    host = _prefilled(model)
    rows = _rows(4)
    counters: Counter[str] = Counter()

    def broken(_: object) -> np.ndarray:
        raise ValueError("no token to embed")

    async def scenario() -> list[np.ndarray | BaseException]:
        compute = ComputeThread()
        batcher = DecodeBatcher(compute, Slowdown(), counters)
        try:
            release, held = await _while_busy(compute)
            async with asyncio.timeout(30):
                steps = [
                    asyncio.ensure_future(batcher.forward((1, host), "r0", 3, lambda _: rows[0])),
                    asyncio.ensure_future(batcher.forward((1, host), "r1", 9, lambda _: rows[1])),
                    asyncio.ensure_future(batcher.forward((1, host), "r2", 1, broken)),
                    asyncio.ensure_future(batcher.forward((1, host), "r3", 5, lambda _: rows[3])),
                ]
                await asyncio.sleep(0.05)
                release.set()
                await held
                return list(await asyncio.gather(*steps, return_exceptions=True))
        finally:
            compute.close()

    first, missing, bad, last = asyncio.run(scenario())
    assert isinstance(missing, KvMissing) and isinstance(bad, ValueError)
    assert isinstance(first, np.ndarray) and isinstance(last, np.ndarray)
    assert (counters["decode_batches"], counters["decode_batched_rows"]) == (1, 2)


def test_steps_of_another_epoch_or_segment_do_not_join(model: Path) -> None:
    torch.set_num_threads(1)
    host, other = _prefilled(model), _prefilled(model)
    rows = _rows(4)
    counters: Counter[str] = Counter()

    async def scenario() -> None:
        compute = ComputeThread()
        batcher = DecodeBatcher(compute, Slowdown(), counters)
        try:
            release, held = await _while_busy(compute)
            async with asyncio.timeout(30):
                keys = [(1, host), (2, host), (1, other), (1, host)]
                steps = [asyncio.ensure_future(batcher.forward(key, f"r{n}", PROMPT_LENGTHS[n], lambda _, r=row: r))
                         for n, (key, row) in enumerate(zip(keys, rows, strict=True))]  # fmt: skip
                await asyncio.sleep(0.05)
                release.set()
                await held
                await asyncio.gather(*steps)
        finally:
            compute.close()

    asyncio.run(scenario())
    assert (counters["decode_batches"], counters["decode_batched_rows"]) == (1, 2)


def test_the_heads_of_a_batch_run_as_one_call_on_the_stacked_rows(model: Path) -> None:
    """At the entry a step first samples the previous pass's token: the head runs once
    for the batch, and each step gets its own rows' logits."""
    torch.set_num_threads(1)
    host = _prefilled(model)
    rows = _rows(4)
    head_weight = torch.randn(64, 10)
    calls: list[int] = []

    def head(hidden: np.ndarray) -> torch.Tensor:
        calls.append(hidden.shape[0])
        return torch.from_numpy(hidden) @ head_weight

    seen: dict[int, torch.Tensor] = {}

    def rows_from(number: int) -> Callable[[torch.Tensor | None], np.ndarray]:
        def make(logits: torch.Tensor | None) -> np.ndarray:
            assert logits is not None
            seen[number] = logits
            return rows[number]

        return make

    async def scenario() -> None:
        compute = ComputeThread()
        batcher = DecodeBatcher(compute, Slowdown(), Counter())
        try:
            release, held = await _while_busy(compute)
            async with asyncio.timeout(30):
                steps = [asyncio.ensure_future(batcher.forward((1, host), f"r{n}", PROMPT_LENGTHS[n], rows_from(n),
                                                               Head(head, rows[n])))  # fmt: skip
                         for n in range(4)]  # fmt: skip
                await asyncio.sleep(0.05)
                release.set()
                await held
                await asyncio.gather(*steps)
        finally:
            compute.close()

    asyncio.run(scenario())
    assert calls == [4]
    for number in range(4):
        torch.testing.assert_close(seen[number], torch.from_numpy(rows[number]) @ head_weight)


def test_a_step_that_comes_while_its_batch_runs_joins_that_batchs_next_steps(model: Path) -> None:
    """r3's step queues while r0-r2's batch runs; r0-r2 queue their next steps as soon as
    their results come. The next job is submitted only then, so r3 runs with them (one
    batch of 4), not alone the moment the first batch ends (batches of 1 and 3 in turn,
    for good: what a single-stage entry did with 8 streams)."""
    torch.set_num_threads(1)
    host = _prefilled(model)
    rows = _rows(4)
    counters: Counter[str] = Counter()
    inside, proceed = threading.Event(), threading.Event()

    def first_row_of_r0(_: object) -> np.ndarray:
        inside.set()  # the first batch is running
        proceed.wait(30)
        return rows[0]

    async def scenario() -> None:
        compute = ComputeThread()
        batcher = DecodeBatcher(compute, Slowdown(), counters)

        async def two_steps(number: int) -> None:
            first = first_row_of_r0 if number == 0 else (lambda _, r=rows[number]: r)
            await batcher.forward((1, host), f"r{number}", PROMPT_LENGTHS[number], first)
            await batcher.forward((1, host), f"r{number}", PROMPT_LENGTHS[number] + 1, lambda _: rows[number])

        try:
            release, held = await _while_busy(compute)
            async with asyncio.timeout(30):
                requests = [asyncio.ensure_future(two_steps(n)) for n in range(3)]
                await asyncio.sleep(0.05)
                release.set()
                await held
                await asyncio.to_thread(inside.wait, 30)
                late = asyncio.ensure_future(batcher.forward((1, host), "r3", PROMPT_LENGTHS[3], lambda _: rows[3]))
                await asyncio.sleep(0.05)  # queued while the first batch runs
                proceed.set()
                await asyncio.gather(*requests, late)
        finally:
            compute.close()

    asyncio.run(scenario())
    assert (counters["decode_batches"], counters["decode_batched_rows"]) == (2, 3 + 4)


def test_a_refused_job_fails_its_steps_and_the_key_runs_again_after(model: Path) -> None:
    """The compute queue is full: the step's job is refused (ComputeBusy) and the step
    fails so; once the queue frees, a new step of the same key runs (the key was not
    left waiting for a job that never comes), and no queue entry is left behind."""
    torch.set_num_threads(1)
    host = _prefilled(model)
    rows = _rows(2)
    counters: Counter[str] = Counter()

    async def scenario() -> tuple[BaseException | np.ndarray, np.ndarray, DecodeBatcher]:
        compute = ComputeThread(max_pending=1)
        batcher = DecodeBatcher(compute, Slowdown(), counters)
        try:
            release, held = await _while_busy(compute)
            async with asyncio.timeout(30):
                refused = await asyncio.gather(
                    batcher.forward((1, host), "r0", PROMPT_LENGTHS[0], lambda _: rows[0]), return_exceptions=True)
                release.set()
                await held
                ran = await batcher.forward((1, host), "r1", PROMPT_LENGTHS[1], lambda _: rows[1])
                return refused[0], ran, batcher
        finally:
            compute.close()

    refused, ran, batcher = asyncio.run(scenario())
    assert isinstance(refused, ComputeBusy)
    assert isinstance(ran, np.ndarray) and ran.shape == (1, 64)
    assert batcher._queued == {} and batcher._active == set()  # noqa: SLF001 - nothing held


def test_a_step_cancelled_while_its_key_runs_leaves_no_entry_behind(model: Path) -> None:
    """r1's step queues while r0's batch runs and is cancelled before that batch ends:
    nothing runs for it, the key goes idle, and no entry keeps the segment host."""
    torch.set_num_threads(1)
    host = _prefilled(model)
    rows = _rows(2)
    inside, proceed = threading.Event(), threading.Event()

    def slow_row(_: object) -> np.ndarray:
        inside.set()
        proceed.wait(30)
        return rows[0]

    async def scenario() -> DecodeBatcher:
        compute = ComputeThread()
        batcher = DecodeBatcher(compute, Slowdown(), Counter())
        try:
            async with asyncio.timeout(30):
                first = asyncio.ensure_future(batcher.forward((1, host), "r0", PROMPT_LENGTHS[0], slow_row))
                await asyncio.to_thread(inside.wait, 30)
                late = asyncio.ensure_future(batcher.forward((1, host), "r1", PROMPT_LENGTHS[1], lambda _: rows[1]))
                await asyncio.sleep(0.05)
                late.cancel()
                await asyncio.gather(late, return_exceptions=True)
                proceed.set()
                await first
                for _ in range(5):  # the job's end comes back in callbacks
                    await asyncio.sleep(0.01)
                return batcher
        finally:
            compute.close()

    batcher = asyncio.run(scenario())
    assert batcher._queued == {} and batcher._active == set()  # noqa: SLF001 - nothing held
