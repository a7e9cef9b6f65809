"""The entry's admission decisions as pure functions (services/worker/admission.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.worker.admission import (
    DEFAULT_MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_CAP,
    QUEUE_CAP,
    QUEUE_FLOOR,
    TYPICAL_NEW_TOKENS,
    TYPICAL_PROMPT_TOKENS,
    Waiting,
    WaitingQueue,
    decide,
    in_flight_for_speed,
    queue_bound_for,
    ready,
)
from services.worker.kv_budget import request_kv_bytes
from shared.messages import GenerateRequest


def _request(index: int, timeout_s: float = 60.0) -> GenerateRequest:
    return GenerateRequest(request_id=f"r{index}", reply_to="c1", token_ids=(1, 2),  # type: ignore[arg-type]
                           timeout_s=timeout_s)  # fmt: skip


@pytest.mark.parametrize(("in_flight", "waiting", "expected"), [
    (0, 0, "start"), (7, 0, "start"),  # a free slot and nobody waiting
    (8, 0, "queue"), (8, 9, "queue"),  # every slot taken: wait while the queue has room
    (3, 1, "queue"),  # a free slot, but someone waits: never pass them (FIFO)
    (8, 10, "busy"), (3, 10, "busy"),  # the queue is full
])  # fmt: skip
def test_decide(in_flight: int, waiting: int, expected: str) -> None:
    assert decide(in_flight, waiting, max_in_flight=8, queue_bound=10) == expected


def test_a_zero_queue_bound_refuses_at_once_past_max_in_flight() -> None:
    assert decide(1, 0, 2, 0) == "start" and decide(2, 0, 2, 0) == "busy"


def test_ready_takes_the_oldest_for_the_free_slots_and_expires_the_late() -> None:
    items = [Waiting(_request(0, timeout_s=1.0), 0.0, 0), Waiting(_request(1), 0.5, 1),
             Waiting(_request(2), 0.6, 2), Waiting(_request(3, timeout_s=0.1), 0.7, 3)]  # fmt: skip
    start, expired = ready(items, in_flight=6, max_in_flight=8, now_s=2.0)
    assert [w.request.request_id for w in start] == ["r1", "r2"]  # the two oldest still alive
    assert [w.request.request_id for w in expired] == ["r0", "r3"]
    start, expired = ready(items, in_flight=8, max_in_flight=8, now_s=0.75)
    assert start == [] and expired == []  # no slot, nobody late: all keep waiting


@given(st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=60))
def test_every_queued_request_starts_in_arrival_order(frees: list[int]) -> None:
    """Whatever the pattern of freed slots, requests start in exactly the order they
    arrived (none is passed over, none starves while slots keep freeing)."""
    queue = WaitingQueue()
    for index in range(40):
        queue.push(_request(index), float(index), index)
    started: list[str] = []
    for free in [*frees, *[1] * 40]:
        start, expired = queue.take(in_flight=4 - free, max_in_flight=4, now_s=1.0)
        assert expired == []
        started += [w.request.request_id for w in start]
    assert started == [f"r{i}" for i in range(40)] and len(queue) == 0


def test_a_resubmission_keeps_its_place_and_deadline() -> None:
    queue = WaitingQueue()
    queue.push(_request(0, timeout_s=5.0), 1.0, 0)
    queue.push(_request(1), 2.0, 1)
    queue.replace(_request(0, timeout_s=50.0).model_copy(update={"resume_token_ids": ()}))
    first = queue.get("r0")
    assert first is not None and first.arrived_s == 1.0 and first.request.resume_token_ids == ()
    start, _ = queue.take(0, 1, now_s=3.0)
    assert [w.request.request_id for w in start] == ["r0"]


def test_queue_bound_from_the_kv_budgets() -> None:
    per_token = 1024
    need = {node: request_kv_bytes(per_token, TYPICAL_PROMPT_TOKENS, TYPICAL_NEW_TOKENS, n)
            for node, n in (("a", 1), ("b", 2))}  # fmt: skip
    blocks = {"a": 1, "b": 2}
    # b's budget holds 100 typical requests, a's 500: the smallest decides
    assert queue_bound_for({"a": 500 * need["a"], "b": 100 * need["b"] + 1}, blocks, per_token) == 100
    assert queue_bound_for({"a": 10 * need["a"]}, blocks, per_token) == QUEUE_FLOOR  # never below
    assert queue_bound_for({"a": 10**15, "b": 10**15}, blocks, per_token) == QUEUE_CAP  # nor above
    assert queue_bound_for({}, blocks, per_token) == QUEUE_FLOOR  # no budget known
    assert queue_bound_for({"a": None}, blocks, per_token) == QUEUE_FLOOR
    assert queue_bound_for({"a": 10**9}, blocks, 0) == QUEUE_FLOOR  # an encoder keeps no KV


def test_max_in_flight_from_the_measured_speed() -> None:
    assert in_flight_for_speed(None, 30, 0.5) == DEFAULT_MAX_IN_FLIGHT  # not measured yet
    assert in_flight_for_speed(0.0, 30, 0.5) == DEFAULT_MAX_IN_FLIGHT
    # SmolLM2 on this CPU: about 2 ms per block, 30 blocks: 60 ms a token alone
    assert in_flight_for_speed(0.002, 30, 0.5) == 8
    assert in_flight_for_speed(0.1, 30, 0.5) == 1  # a slow node: one at a time, the rest wait
    assert in_flight_for_speed(1e-5, 4, 0.5) == MAX_IN_FLIGHT_CAP  # a tiny model: capped
