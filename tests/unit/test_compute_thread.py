"""The worker's compute thread: results, errors, order, cancellation, close."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.worker.compute_thread import ComputeClosed, ComputeThread


def test_jobs_run_on_one_other_thread_in_order_with_results_and_errors() -> None:
    async def main() -> None:
        compute = ComputeThread()
        loop_thread = threading.get_ident()
        seen: list[tuple[int, int]] = []
        running = 0

        def job(number: int) -> int:
            nonlocal running
            running += 1
            assert running == 1, "jobs overlapped"
            time.sleep(0.002)
            seen.append((number, threading.get_ident()))
            running -= 1
            return number * 10

        try:
            results = await asyncio.gather(*(compute.run(job, n) for n in range(20)))
            assert results == [n * 10 for n in range(20)]
            assert [n for n, _ in seen] == list(range(20))
            assert {thread for _, thread in seen} != {loop_thread} and len({t for _, t in seen}) == 1

            def fails() -> None:
                raise ValueError("bad shapes")

            with pytest.raises(ValueError, match="bad shapes"):
                await compute.run(fails)
            assert await compute.run(job, 7) == 70  # the thread survived the error
            assert compute.pending == 0
            assert compute.busy_s() >= 21 * 0.002
        finally:
            compute.close()

    asyncio.run(main())


def test_a_cancelled_caller_skips_a_job_that_has_not_started() -> None:
    async def main() -> None:
        compute = ComputeThread()
        release = threading.Event()
        ran: list[str] = []
        try:
            blocker = asyncio.ensure_future(compute.run(release.wait, 5))
            queued = asyncio.ensure_future(compute.run(ran.append, "queued"))
            await asyncio.sleep(0.05)
            queued.cancel()
            release.set()
            assert await blocker is True
            with pytest.raises(asyncio.CancelledError):
                await queued
            await compute.run(ran.append, "after")
            assert ran == ["after"]
        finally:
            compute.close()

    asyncio.run(main())


def test_close_fails_queued_jobs_and_refuses_new_ones() -> None:
    async def main() -> None:
        compute = ComputeThread()
        release = threading.Event()
        blocker = asyncio.ensure_future(compute.run(release.wait, 5))
        queued = asyncio.ensure_future(compute.run(lambda: "never"))
        await asyncio.sleep(0.05)
        compute.close()
        release.set()
        assert await blocker is True  # the running job finishes
        with pytest.raises(ComputeClosed):
            await asyncio.wait_for(queued, 2)
        with pytest.raises(ComputeClosed):
            await compute.run(lambda: None)

    asyncio.run(main())
