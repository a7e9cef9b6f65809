"""Pure parts of fault handling: the entry's adaptive pass deadline and the client's
in-order, exactly-once token delivery across resubmissions."""

from __future__ import annotations

import asyncio
from typing import Any

from services.cli.client import ClientOptions, _Session
from services.worker.deadline import StageDeadline
from shared.config import BusSettings
from shared.messages import GenerateRequest, Plan, RequestFinished, Segment, TokenGenerated
from shared.messages.requests import Reply, seal_reply


def test_deadline_is_the_cap_until_a_pass_answered() -> None:
    deadline = StageDeadline(cap_s=30.0, floor_s=2.0, factor=10.0)
    assert deadline.timeout_s(1) == 30.0
    deadline.observe(100, 0.5)  # a first prefill: linear guess, 5 ms per token
    assert deadline.timeout_s(100) == 5.0 and deadline.timeout_s(1) == 2.0


def test_deadline_follows_decode_and_prefill_times_within_floor_and_cap() -> None:
    deadline = StageDeadline(cap_s=30.0, floor_s=2.0, factor=10.0)
    for _ in range(50):
        deadline.observe(1, 0.02)
        deadline.observe(201, 0.02 + 200 * 0.004)
    assert abs(deadline.timeout_s(1) - 2.0) < 1e-9  # 10 x 20 ms is below the floor
    assert abs(deadline.timeout_s(201) - 10 * (0.02 + 0.8)) < 0.05
    assert deadline.timeout_s(100_000) == 30.0


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, Any]] = []
        self.sessions = 1

    async def publish(self, topic: Any, message: Any, **params: str) -> None:
        self.sent.append((message, params))


def _session() -> tuple[_Session, FakeBus, list[int]]:
    bus = FakeBus()
    plan = Plan(epoch=1, model_id="m", entry_node="car", segments=(Segment(node="car", start=0, end=2),))  # type: ignore[arg-type]
    request = GenerateRequest(request_id="r1", reply_to="c1", token_ids=(1, 2), max_new_tokens=5)  # type: ignore[arg-type]
    seen: list[int] = []
    session = _Session(bus, ClientOptions(BusSettings()), request, plan, lambda t: seen.append(t.index))  # type: ignore[arg-type]
    session.deadline = 1e18
    return session, bus, seen


def _token(index: int) -> TokenGenerated:
    return TokenGenerated(request_id="r1", index=index, token_id=10 + index, text=f"t{index}")  # type: ignore[arg-type]


def _sealed(session: _Session, reply: Reply) -> Reply:
    """``reply`` as its entry sends it: sealed with the request's reply key (a client drops
    an unsealed one, tests/unit/test_reply_mac.py)."""
    assert session.message.reply_key is not None
    return seal_reply(reply, session.message.reply_key)


def test_tokens_are_delivered_once_in_order_and_a_gap_asks_for_a_resend() -> None:
    async def scenario() -> None:
        session, bus, seen = _session()
        for index in (0, 1, 1, 0, 3):  # a duplicate, a stale copy, then a gap (2 lost)
            await session.handle(_sealed(session, _token(index)))
        assert seen == [0, 1] and len(bus.sent) == 1
        resend, params = bus.sent[0]
        assert resend.resume_token_ids == (10, 11) and params == {"node": "car"}
        await session.handle(_sealed(session, _token(2)))
        assert seen == [0, 1, 2, 3]
        finished = _sealed(session, RequestFinished(request_id="r1", token_ids=(10, 11, 12, 13, 14), text="",  # type: ignore[arg-type]
                                                    finish_reason="length", ttft_s=0.1, tpot_s=0.01))  # type: ignore[arg-type]
        assert await session.handle(finished) is finished
        assert seen == [0, 1, 2, 3, 4]  # the token lost with the broker comes from the final reply

    asyncio.run(scenario())


def test_a_new_entry_in_the_plan_gets_the_request_with_the_tokens_held() -> None:
    async def scenario() -> None:
        session, bus, _ = _session()
        await session.handle(_sealed(session, _token(0)))
        moved = Plan(epoch=2, model_id="m", entry_node="car2", segments=(Segment(node="car2", start=0, end=2),))  # type: ignore[arg-type]
        await session.handle(moved)
        resend, params = bus.sent[-1]
        assert params == {"node": "car2"} and resend.resume_token_ids == (10,)

    asyncio.run(scenario())
