"""Every worker queue has a bound and a stated policy when it is full (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from services.worker.compute_thread import ComputeBusy, ComputeThread
from services.worker.entry import ReplyMessage
from services.worker.replies import ReplySender
from services.worker.shaper import EgressShaper, LinkShape
from shared.errors import Overloaded
from shared.messages import GenerateRequest, RequestFailed, RequestFinished, TokenGenerated
from tests.unit.test_entry_admission import make_role


def token(index: int) -> TokenGenerated:
    return TokenGenerated(request_id="r1", index=index, token_id=index, text="")  # type: ignore[arg-type]


def finished(rid: str) -> RequestFinished:
    return RequestFinished(request_id=rid, token_ids=(1,), text="", finish_reason="length",  # type: ignore[arg-type]
                           ttft_s=0.0, tpot_s=0.0)  # fmt: skip


def test_a_full_reply_queue_drops_new_tokens_and_keeps_every_final_reply() -> None:
    sender = ReplySender("car", max_queued=3)
    for index in range(3):
        sender.queue("c1", token(index))
    sender.queue("c1", token(3))  # full: the new token is dropped
    assert [m.index for _, m in sender.queued()] == [0, 1, 2] and sender.dropped == 1  # type: ignore[union-attr]
    sender.queue("c1", finished("r1"))  # a final reply takes the oldest token's place
    assert [type(m).__name__ for _, m in sender.queued()] == ["TokenGenerated"] * 2 + ["RequestFinished"]
    assert [m.index for _, m in sender.queued()[:2]] == [1, 2]  # type: ignore[union-attr]
    sender.queue("c2", finished("r2"))
    sender.queue("c3", finished("r3"))
    assert [m.request_id for _, m in sender.queued()] == ["r1", "r2", "r3"]
    sender.queue("c4", finished("r4"))  # only finals: the oldest one goes (the entry keeps it for a resubmission)
    assert [m.request_id for _, m in sender.queued()] == ["r2", "r3", "r4"] and sender.dropped == 5  # one per reply that went


def test_a_full_compute_queue_refuses_jobs_with_a_typed_error() -> None:
    compute = ComputeThread(max_pending=2)
    gate = threading.Event()

    async def scenario() -> None:
        held = [asyncio.create_task(compute.run(gate.wait, 10.0)) for _ in range(2)]
        await asyncio.sleep(0)  # both submitted
        with pytest.raises(ComputeBusy, match="compute queue is full") as refused:
            await compute.run(sum, (1, 2))
        assert isinstance(refused.value, Overloaded) and compute.refused == 1
        gate.set()
        assert await asyncio.gather(*held) == [True, True]
        assert await compute.run(sum, (1, 2)) == 3  # room again

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        compute.close()


def test_a_full_shaped_link_drops_the_newest_frame() -> None:
    sent: list[bytes] = []

    async def send(destination: str, frame: bytes) -> None:
        sent.append(frame)

    shaper = EgressShaper(send, max_queued=2)
    shaper.schedule.set_shape("rsu", LinkShape(None, 30.0))  # nothing leaves during the test

    async def scenario() -> None:
        runner = asyncio.create_task(shaper.run())
        await asyncio.sleep(0)
        for frame in (b"a", b"b", b"c", b"d"):
            await shaper.send("rsu", frame)
            await asyncio.sleep(0)  # the drain task takes the first one and sleeps on it
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(scenario())
    assert shaper.dropped == 1 and sent == []  # one in the drain task's hands, two queued, one dropped


def test_an_entry_whose_compute_queue_is_full_answers_overloaded(tmp_path: Path) -> None:
    from shared.model.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint("llama", tmp_path / "llama", layers=2, seed=1)
    compute = ComputeThread(max_pending=0)  # every job refused
    replies: list[ReplyMessage] = []
    role = make_role(model_dir, compute, replies)
    request = GenerateRequest(request_id="r1", reply_to="c1", token_ids=(1, 2), max_new_tokens=2)  # type: ignore[arg-type]
    try:
        assert role.admit(request) == "start"
        asyncio.run(role.serve(request))
    finally:
        compute.close()
    assert isinstance(replies[-1], RequestFailed) and replies[-1].error == "overloaded", replies
    assert role.journal == {}
