"""Exact admission: a burst taken without yielding starts exactly ``max_in_flight``,
queues the next ``max_queued`` in arrival order and refuses the rest ``busy`` at once;
queued requests start, oldest first, as slots free, and all complete exactly.

A real `EntryRole` over a tiny llama (its runtime, tokenizer and a compute thread); the
pipeline behind it is the unsplit model's blocks on that compute thread. The burst is
handled as the worker's request loop handles it (`Desk`: `admit`, a serve task for each
request told to start, `take_waiting` when one ends), every request before any task runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.worker.compute import ComputeThread, SegmentHost, Slowdown
from services.worker.entry import EntryRole, NextToken, ReplyMessage
from shared.messages import EmbedRequest, GenerateRequest, RequestFailed, RequestFinished
from shared.model.checkpoint import Checkpoint
from shared.model.pipeline import LocalPipeline
from shared.model.runtime import EntryRuntime
from shared.model.tiny import write_tiny_checkpoint
from shared.model.tokenizer import TextTokenizer

MAX_IN_FLIGHT, MAX_QUEUED = 4, 10


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
                     current_epoch=lambda: 1, max_queued=MAX_QUEUED)  # fmt: skip
    return role


class Desk:
    """What the worker service does around an `EntryRole` (services/worker/service.py:
    `_on_request`, `_serve_one`): refusals go to the replies, started requests get a
    serve task, and each ending one starts the waiting requests that take its slot."""

    def __init__(self, role: EntryRole, replies: list[ReplyMessage]) -> None:
        self.role, self.replies = role, replies
        self.tasks: list[asyncio.Task[None]] = []
        self.started: list[str] = []

    def offer(self, request: GenerateRequest) -> None:
        admitted = self.role.admit(request)
        if isinstance(admitted, RequestFailed):
            self.replies.append(admitted)  # the worker queues it on the same reply sender
        elif admitted == "start":
            self._start(request)

    def _start(self, request: GenerateRequest | EmbedRequest) -> None:
        self.started.append(request.request_id)
        self.tasks.append(asyncio.create_task(self._serve(request)))

    async def _serve(self, request: GenerateRequest | EmbedRequest) -> None:
        await self.role.serve(request)
        for waiting in self.role.take_waiting():
            self._start(waiting)

    async def done(self, timeout_s: float = 120.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not all(task.done() for task in self.tasks):
                await asyncio.gather(*self.tasks)


def burst(desk: Desk, requests: list[GenerateRequest]) -> None:
    """What the worker's request loop does with requests already queued: no yield between."""
    for request in requests:
        desk.offer(request)


def request(index: int, max_new_tokens: int = 6) -> GenerateRequest:
    return GenerateRequest(request_id=f"r{index}", reply_to="client1",  # type: ignore[arg-type]
                           token_ids=(3 + index, 7, 11), max_new_tokens=max_new_tokens)  # fmt: skip


def finals(replies: list[ReplyMessage]) -> dict[str, ReplyMessage]:
    return {r.request_id: r for r in replies if isinstance(r, RequestFinished | RequestFailed)}


def test_a_burst_starts_max_in_flight_queues_up_to_the_bound_and_refuses_the_rest_busy(
    model_dir: Path, compute: ComputeThread
) -> None:
    replies: list[ReplyMessage] = []
    role = make_role(model_dir, compute, replies)
    desk = Desk(role, replies)
    wave = [request(i) for i in range(25)]
    accepted = MAX_IN_FLIGHT + MAX_QUEUED

    async def scenario() -> None:
        burst(desk, wave)
        assert len(role.journal) == MAX_IN_FLIGHT and len(role.waiting) == MAX_QUEUED
        # the excess is refused at once, before any request ran: the last ones to arrive
        assert [r.request_id for r in replies] == [f"r{i}" for i in range(accepted, 25)]
        assert all(isinstance(r, RequestFailed) and r.error == "busy" for r in replies)
        await desk.done()

    asyncio.run(scenario())
    assert desk.started == [f"r{i}" for i in range(accepted)]  # in arrival order (FIFO)
    answered = finals(replies)
    assert set(answered) == {r.request_id for r in wave}  # every request has its final answer
    done = {rid: r for rid, r in answered.items() if isinstance(r, RequestFinished)}
    assert set(done) == {f"r{i}" for i in range(accepted)}  # every one that waited completed
    reference = LocalPipeline(model_dir, ())
    for i in range(accepted):
        assert done[f"r{i}"].token_ids == reference.generate([3 + i, 7, 11], 6).token_ids  # type: ignore[union-attr]
    assert role.journal == {} and len(role.waiting) == 0


def test_without_a_queue_a_burst_past_max_in_flight_is_busy_and_slots_free_for_the_next(
    model_dir: Path, compute: ComputeThread
) -> None:
    replies: list[ReplyMessage] = []
    role = make_role(model_dir, compute, replies)
    role.max_queued = 0  # the bound 0: nothing waits
    desk = Desk(role, replies)

    async def scenario() -> None:
        for wave in range(3):  # each wave after the previous ended: the same exact count
            before = len(desk.tasks)
            burst(desk, [request(100 * wave + i, 2) for i in range(MAX_IN_FLIGHT + 3)])
            assert len(desk.tasks) - before == MAX_IN_FLIGHT
            await desk.done()
            assert role.journal == {}

    asyncio.run(scenario())
    answered = finals(replies)
    assert sum(isinstance(r, RequestFinished) for r in answered.values()) == 3 * MAX_IN_FLIGHT
    assert sum(isinstance(r, RequestFailed) and r.error == "busy" for r in answered.values()) == 9


def test_a_request_whose_deadline_passes_while_it_waits_is_busy(model_dir: Path, compute: ComputeThread) -> None:
    replies: list[ReplyMessage] = []
    role = make_role(model_dir, compute, replies)
    for i in range(MAX_IN_FLIGHT):  # every slot taken (their serve tasks never run here)
        assert role.admit(request(i)) == "start"
    late = request(50).model_copy(update={"timeout_s": 0.01})
    patient = request(51)
    assert role.admit(late) == "queued" and role.admit(patient) == "queued"
    time.sleep(0.05)  # past the late one's deadline
    assert role.take_waiting() == []  # no slot is free: nothing starts
    assert len(replies) == 1 and isinstance(replies[0], RequestFailed), replies
    assert replies[0].request_id == "r50" and replies[0].error == "busy"
    assert "past its deadline of 0.01 s" in replies[0].message
    del role.journal["r0"]  # a request ended: its slot goes to the one still waiting
    assert [r.request_id for r in role.take_waiting()] == ["r51"]
    assert role.journal["r51"].arrived_s < time.perf_counter() - 0.04  # TTFT counts the wait


def test_repeats_of_a_waiting_request(model_dir: Path, compute: ComputeThread) -> None:
    replies: list[ReplyMessage] = []
    role = make_role(model_dir, compute, replies)
    for i in range(MAX_IN_FLIGHT):
        role.admit(request(i))
    assert role.admit(request(7)) == "queued" and role.admit(request(8)) == "queued"

    async def scenario() -> None:
        assert await role.repeat(request(7))  # a QoS 1 redelivery: dropped
        assert await role.repeat(request(7).model_copy(update={"resume_token_ids": (), "reply_to": "client2"}))
        assert await role.repeat(request(8, max_new_tokens=9))  # another request, same id

    asyncio.run(scenario())
    assert role.counters["requests_duplicate"] == 1 and role.counters["requests_resynced"] == 1
    assert len(replies) == 1 and isinstance(replies[0], RequestFailed), replies
    assert replies[0].error == "invalid_request" and "already queued" in replies[0].message
    waiting = role.waiting.get("r7")
    assert waiting is not None and waiting.request.reply_to == "client2"  # the newest copy...
    del role.journal["r0"]
    assert [r.request_id for r in role.take_waiting()] == ["r7"]  # ...in its first place
    role.drop_waiting("node car is not the entry of the current plan")  # the plan moved the entry
    assert isinstance(replies[-1], RequestFailed) and replies[-1].request_id == "r8"
    assert replies[-1].error == "invalid_request" and "not the entry" in replies[-1].message
    assert len(role.waiting) == 0
