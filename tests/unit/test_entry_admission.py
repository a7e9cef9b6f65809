"""Exact admission: a burst taken without yielding admits exactly ``max_in_flight``.

A real `EntryRole` over a tiny llama (its runtime, tokenizer and a compute thread); the
pipeline behind it is the unsplit model's blocks on that compute thread. The burst is
handled as the worker's request loop handles it: `admit`, then a serve task, for every
request before any task runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.worker.compute import ComputeThread, SegmentHost, Slowdown
from services.worker.entry import EntryRole, NextToken, ReplyMessage
from shared.messages import GenerateRequest, RequestFailed, RequestFinished
from shared.model.checkpoint import Checkpoint
from shared.model.pipeline import LocalPipeline
from shared.model.runtime import EntryRuntime
from shared.model.tiny import write_tiny_checkpoint
from shared.model.tokenizer import TextTokenizer

MAX_IN_FLIGHT = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), layers=4, seed=5)


@pytest.fixture
def compute() -> Iterator[ComputeThread]:
    thread = ComputeThread()
    yield thread
    thread.close()


def make_role(model_dir: Path, compute: ComputeThread, replies: list[ReplyMessage]) -> EntryRole:
    source = Checkpoint(model_dir)
    host = SegmentHost(source, 0, source.config.num_layers)

    async def pipeline_pass(request_id: str, step: int, token_ids: np.ndarray, position: int,
                            last_only: bool, head: NextToken | None) -> tuple[np.ndarray, int]:  # fmt: skip
        def job() -> np.ndarray:
            ids = head() if head is not None else token_ids
            hidden = host.forward(request_id, role.embed_tokens(ids, position), position, Slowdown())
            return hidden[-1:] if last_only else hidden

        return await compute.run(job), 1

    role = EntryRole(EntryRuntime(source), TextTokenizer.from_file(source.tokenizer_path), compute.run,
                     pipeline_pass, lambda _client, reply: replies.append(reply), MAX_IN_FLIGHT, 8192,
                     current_epoch=lambda: 1)  # fmt: skip
    return role


def burst(role: EntryRole, requests: list[GenerateRequest],
          replies: list[ReplyMessage]) -> list[asyncio.Task[None]]:  # fmt: skip
    """What the worker's request loop does with requests already queued: no yield between."""
    tasks = []
    for request in requests:
        refusal = role.admit(request)
        if refusal is None:
            tasks.append(asyncio.create_task(role.serve(request)))
        else:
            replies.append(refusal)  # the worker queues it on the same reply sender
    return tasks


def request(index: int, max_new_tokens: int = 6) -> GenerateRequest:
    return GenerateRequest(request_id=f"r{index}", reply_to="client1",  # type: ignore[arg-type]
                           token_ids=(3 + index, 7, 11), max_new_tokens=max_new_tokens)  # fmt: skip


def finals(replies: list[ReplyMessage]) -> dict[str, ReplyMessage]:
    return {r.request_id: r for r in replies if isinstance(r, RequestFinished | RequestFailed)}


def test_a_burst_admits_exactly_max_in_flight_and_the_rest_are_busy(
    model_dir: Path, compute: ComputeThread
) -> None:
    replies: list[ReplyMessage] = []
    role = make_role(model_dir, compute, replies)
    wave = [request(i) for i in range(25)]

    async def scenario() -> tuple[int, int]:
        tasks = burst(role, wave, replies)
        admitted = len(role.journal)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return len(tasks), admitted

    started, admitted = asyncio.run(scenario())
    assert started == admitted == MAX_IN_FLIGHT
    answered = finals(replies)
    assert set(answered) == {r.request_id for r in wave}  # every request has its final answer
    busy = {rid for rid, r in answered.items() if isinstance(r, RequestFailed)}
    assert all(isinstance(answered[rid], RequestFailed) and answered[rid].error == "busy"  # type: ignore[union-attr]
               for rid in busy)  # fmt: skip
    done = {rid: r for rid, r in answered.items() if isinstance(r, RequestFinished)}
    assert len(done) == MAX_IN_FLIGHT and len(busy) == len(wave) - MAX_IN_FLIGHT
    assert set(done) == {f"r{i}" for i in range(MAX_IN_FLIGHT)}  # the first ones, in arrival order
    reference = LocalPipeline(model_dir, ())
    for i in range(MAX_IN_FLIGHT):
        assert done[f"r{i}"].token_ids == reference.generate([3 + i, 7, 11], 6).token_ids  # type: ignore[union-attr]
    assert role.journal == {}


def test_slots_free_when_requests_end_and_a_later_burst_is_admitted(
    model_dir: Path, compute: ComputeThread
) -> None:
    replies: list[ReplyMessage] = []
    role = make_role(model_dir, compute, replies)

    async def scenario() -> None:
        for wave in range(3):  # each wave after the previous ended: the same exact count
            tasks = burst(role, [request(100 * wave + i, 2) for i in range(MAX_IN_FLIGHT + 3)], replies)
            assert len(tasks) == MAX_IN_FLIGHT
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            assert role.journal == {}

    asyncio.run(scenario())
    answered = finals(replies)
    assert sum(isinstance(r, RequestFinished) for r in answered.values()) == 3 * MAX_IN_FLIGHT
    assert sum(isinstance(r, RequestFailed) and r.error == "busy" for r in answered.values()) == 9
