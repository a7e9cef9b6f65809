"""Replies sealed with the request's reply key (shared/messages/requests.py)."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from shared import codec
from shared.messages import EmbeddingReady, RequestFailed, RequestFinished, TokenGenerated
from shared.messages.requests import Reply, reply_sealed, seal_reply

KEY = secrets.token_hex(32)
REPLIES: tuple[Reply, ...] = (
    TokenGenerated(request_id="a1b2c3d4e5f60718", index=3, token_id=42, text=" Berlin"),  # type: ignore[arg-type]
    RequestFinished(request_id="a1b2c3d4e5f60718", token_ids=(1, 2, 3), text="abc",  # type: ignore[arg-type]
                    ttft_s=0.25, tpot_s=0.0625),  # fmt: skip
    EmbeddingReady(request_id="a1b2c3d4e5f60718", embedding=(0.1, -0.5, 1e-9), elapsed_s=0.01),  # type: ignore[arg-type]
    RequestFailed(request_id="a1b2c3d4e5f60718", error="busy", message="queue full"),  # type: ignore[arg-type]
)


@pytest.mark.parametrize("reply", REPLIES, ids=lambda reply: reply.kind)
def test_a_sealed_reply_verifies_after_the_wire_and_nothing_else_does(reply: Reply) -> None:
    sealed = seal_reply(reply, KEY)
    received = codec.decode(codec.encode(sealed, origin="car", seq=1)).message
    assert reply_sealed(received, KEY)  # type: ignore[arg-type]
    assert not reply_sealed(reply, KEY)  # unsealed
    assert not reply_sealed(sealed, secrets.token_hex(32))  # another key
    assert not reply_sealed(sealed.model_copy(update={"mac": "ab" * 32}), KEY)  # a made-up MAC
    field = next(name for name in ("index", "token_ids", "embedding", "message") if name in type(reply).model_fields)
    changed = {"index": 4, "token_ids": (9,), "embedding": (0.2,), "message": "other"}[field]
    assert not reply_sealed(sealed.model_copy(update={field: changed}), KEY)  # any field changed


def test_the_finished_copy_for_the_orchestrator_carries_no_mac() -> None:
    sealed = seal_reply(REPLIES[1], KEY)
    assert isinstance(sealed, RequestFinished)
    assert sealed.without_content().mac == ""


class _Recorder:
    """The one Bus method ReplySender uses, recording what it publishes."""

    def __init__(self) -> None:
        self.sent: list[Reply] = []
        self.published = asyncio.Event()

    async def publish(self, topic: object, message: Reply, **_: str) -> None:
        self.sent.append(message)
        self.published.set()


def test_a_request_in_flight_keeps_its_first_key_and_a_new_request_under_an_old_id_gets_its_own() -> None:
    from services.worker.replies import ReplySender

    first, second = secrets.token_hex(32), secrets.token_hex(32)
    reply = REPLIES[2]

    async def send_one(sender: ReplySender, recorder: _Recorder) -> Reply:
        sender.queue("alice", reply)
        recorder.published.clear()
        task = asyncio.create_task(sender.run(recorder))  # type: ignore[arg-type]
        await asyncio.wait_for(recorder.published.wait(), 5.0)
        task.cancel()
        return recorder.sent.pop()

    async def scenario() -> tuple[Reply, Reply]:
        sender, recorder = ReplySender("car"), _Recorder()
        sender.remember(reply.request_id, first)
        sender.remember(reply.request_id, second)  # a resubmission cannot redirect the seal
        kept = await send_one(sender, recorder)
        sender.remember(reply.request_id, second, new=True)  # the entry took a new request
        return kept, await send_one(sender, recorder)

    kept, renewed = asyncio.run(scenario())
    assert reply_sealed(kept, first) and not reply_sealed(kept, second)
    assert reply_sealed(renewed, second) and not reply_sealed(renewed, first)
