"""The entry worker's time-to-first-token and time-per-output-token histograms: one
first-token observation per request (from its arrival at the entry) and one gap per
later token, so `up` without the gateway still exports latency (shared/metrics.py).

A real `EntryRole` over a tiny llama on a compute thread (tests/unit/test_entry_admission.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.worker.compute import ComputeThread
from services.worker.entry import ReplyMessage
from shared.messages import RequestFinished, TokenGenerated
from shared.metrics import ServiceMetrics
from shared.model.tiny import write_tiny_checkpoint
from tests.unit.test_entry_admission import make_role, request


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), layers=2, seed=3)


@pytest.fixture
def compute() -> Iterator[ComputeThread]:
    thread = ComputeThread()
    yield thread
    thread.close()


def _count_and_sum(metrics: ServiceMetrics, name: str) -> tuple[float, float]:
    count = metrics.registry.get_sample_value(f"{name}_count")
    total = metrics.registry.get_sample_value(f"{name}_sum")
    assert count is not None and total is not None, name
    return count, total


def test_the_entry_observes_one_first_token_per_request_and_one_gap_per_later_token(
    model_dir: Path, compute: ComputeThread
) -> None:
    replies: list[ReplyMessage] = []
    role = make_role(model_dir, compute, replies)
    metrics = ServiceMetrics("worker test", ("latency",))
    role.latency = metrics

    async def scenario() -> None:
        for index in range(2):
            assert role.admit(request(index, max_new_tokens=5)) == "start"
            await asyncio.wait_for(role.serve(request(index, max_new_tokens=5)), 60)

    asyncio.run(scenario())
    finished = [r for r in replies if isinstance(r, RequestFinished)]
    tokens = [r for r in replies if isinstance(r, TokenGenerated)]
    assert len(finished) == 2 and len(tokens) == 10
    first_count, first_sum = _count_and_sum(metrics, "edgesplit_time_to_first_token_seconds")
    gap_count, gap_sum = _count_and_sum(metrics, "edgesplit_time_per_output_token_seconds")
    assert first_count == 2 and gap_count == 8
    # the entry's own numbers agree with what it reports in each final reply
    assert first_sum == pytest.approx(sum(r.ttft_s for r in finished), rel=0.1, abs=5e-3)
    assert gap_sum == pytest.approx(sum(r.tpot_s * 4 for r in finished), rel=0.1, abs=5e-3)


def test_without_metrics_the_entry_measures_nothing_and_still_serves(model_dir: Path, compute: ComputeThread) -> None:
    replies: list[ReplyMessage] = []
    role = make_role(model_dir, compute, replies)
    assert role.latency is None

    async def scenario() -> None:
        assert role.admit(request(0, max_new_tokens=3)) == "start"
        await asyncio.wait_for(role.serve(request(0, max_new_tokens=3)), 60)

    asyncio.run(scenario())
    assert sum(isinstance(r, TokenGenerated) for r in replies) == 3
