"""Admission at the entry: a bounded FIFO waiting queue in front of ``max_in_flight``.

A request that finds every slot taken waits in arrival order instead of bouncing; it
starts as soon as a slot frees (a request ends), oldest first, so none starves. It is
refused ``busy`` only when the queue is full on arrival, or when its deadline
(``timeout_s`` from its arrival) passes while it still waits. The time it waited counts
against its deadline and its time to first token.

The decisions are pure functions (`decide`, `ready`, `queue_bound_for`,
`in_flight_for_speed`); `WaitingQueue` holds the state and `EntryDesk` (the front desk
of `EntryRole`: admission, the journal of running requests, redeliveries and
resubmissions) acts on them (event loop only).
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from services.worker.kv_budget import request_kv_bytes
from shared.messages import (
    EmbeddingReady,
    EmbedRequest,
    GenerateRequest,
    RequestFailed,
    RequestFinished,
    TokenGenerated,
)

Request = GenerateRequest | EmbedRequest
ReplyMessage = TokenGenerated | RequestFinished | EmbeddingReady | RequestFailed
Reply = Callable[[str, ReplyMessage], None]
"""Queue a reply for a client (never blocks: one sender task publishes them in order)."""

DEFAULT_MAX_IN_FLIGHT = 8
"""Requests in flight at once when the node's speed is not measured yet."""
MAX_IN_FLIGHT_CAP = 64
"""The most requests the speed rule lets a node run at once."""
QUEUE_FLOOR = 64
"""The least default queue bound (a burst of that many waits, whatever the budgets)."""
QUEUE_CAP = 1024
"""The most a default queue bound reaches (about the request subscription's own bound,
`shared/topics.py`: a longer queue would only hold requests the broker side could drop)."""
TYPICAL_PROMPT_TOKENS, TYPICAL_NEW_TOKENS = 128, 64
"""The request the default queue bound is sized for (GenerateRequest's default
``max_new_tokens`` after a 128-token prompt)."""

Decision = Literal["start", "queue", "busy"]


def decide(in_flight: int, waiting: int, max_in_flight: int, queue_bound: int) -> Decision:
    """What to do with a request that just arrived: start it (a slot is free and nobody
    waits: FIFO, a newcomer never passes a waiting request), queue it, or refuse it busy
    (the queue holds ``queue_bound`` already)."""
    if waiting == 0 and in_flight < max_in_flight:
        return "start"
    if waiting < queue_bound:
        return "queue"
    return "busy"


@dataclass(frozen=True)
class Waiting:
    """A request in the queue: when it arrived (perf_counter s) and its deadline."""

    request: Request
    arrived_s: float
    ahead: int
    """Requests in flight or waiting before it when it arrived."""

    @property
    def deadline_s(self) -> float:
        return self.arrived_s + self.request.timeout_s


def ready(waiting: list[Waiting], in_flight: int, max_in_flight: int,
          now_s: float) -> tuple[list[Waiting], list[Waiting]]:  # fmt: skip
    """(to start, expired) from ``waiting`` (in arrival order): the oldest unexpired
    requests that free slots take, and every waiting request whose deadline passed."""
    expired = [item for item in waiting if item.deadline_s <= now_s]
    alive = [item for item in waiting if item.deadline_s > now_s]
    free = max(0, max_in_flight - in_flight)
    return alive[:free], expired


def queue_bound_for(budgets: Mapping[str, int | None], blocks: Mapping[str, int],
                    per_token_block: int) -> int:  # fmt: skip
    """The default queue bound: how many typical requests (`TYPICAL_PROMPT_TOKENS` +
    `TYPICAL_NEW_TOKENS`) the pipeline's KV budgets hold at once (the smallest over its
    nodes with a known budget), between `QUEUE_FLOOR` and `QUEUE_CAP`. ``blocks``: blocks
    per node of the pipeline; ``per_token_block``: KV bytes per token per block (0: an
    encoder, which keeps no KV: the floor)."""
    fits = [budget // need for node in sorted(blocks)
            if (budget := budgets.get(node)) is not None
            and (need := request_kv_bytes(per_token_block, TYPICAL_PROMPT_TOKENS,
                                          TYPICAL_NEW_TOKENS, blocks[node])) > 0]  # fmt: skip
    return max(QUEUE_FLOOR, min(QUEUE_CAP, min(fits, default=QUEUE_FLOOR)))


def in_flight_for_speed(decode_s_per_block: float | None, blocks: int, target_tpot_s: float) -> int:
    """The default ``max_in_flight``: how many streams share the model's decode steps
    (``blocks`` blocks at the measured ``decode_s_per_block``) while each still gets a
    token every ``target_tpot_s``, between 1 and `MAX_IN_FLIGHT_CAP`;
    `DEFAULT_MAX_IN_FLIGHT` when the speed is not measured (None, or not positive)."""
    if decode_s_per_block is None or not decode_s_per_block > 0 or blocks <= 0:
        return DEFAULT_MAX_IN_FLIGHT
    per_token_s = decode_s_per_block * blocks
    return max(1, min(MAX_IN_FLIGHT_CAP, math.floor(target_tpot_s / per_token_s)))


class WaitingQueue:
    """Requests waiting for a slot, in arrival order, by request id (event loop only)."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, Waiting] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, request_id: str) -> Waiting | None:
        return self._items.get(request_id)

    def push(self, request: Request, arrived_s: float, ahead: int) -> None:
        self._items[request.request_id] = Waiting(request, arrived_s, ahead)

    def replace(self, request: Request) -> None:
        """A resubmission of a waiting request: the newest copy (its reply address, resumed
        tokens) keeps the first one's place and deadline."""
        old = self._items[request.request_id]
        self._items[request.request_id] = Waiting(request, old.arrived_s, old.ahead)

    def take(self, in_flight: int, max_in_flight: int, now_s: float) -> tuple[list[Waiting], list[Waiting]]:
        """Remove and return (to start, expired): see `ready`."""
        start, expired = ready(list(self._items.values()), in_flight, max_in_flight, now_s)
        for item in (*start, *expired):
            del self._items[item.request.request_id]
        return start, expired

    def drain(self) -> list[Waiting]:
        """Remove and return every waiting request (the node stopped being the entry)."""
        items = list(self._items.values())
        self._items.clear()
        return items


@dataclass
class JournalEntry:
    """What the entry must remember to replay a request through a new pipeline."""

    request: GenerateRequest | EmbedRequest
    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    """The text streamed with each generated token (resent on a client's resync)."""
    arrived_s: float = field(default_factory=time.perf_counter)
    first_at: float = 0.0
    """When the first new token was sampled (perf_counter)."""
    last_token_at: float | None = None
    """When the latest token was streamed (perf_counter; None: none yet)."""
    kv_epoch: int | None = None
    """The epoch whose pipeline holds this request's KV caches (None: none yet)."""
    replays: int = 0


def asked_of(request: GenerateRequest | EmbedRequest) -> tuple[object, ...]:
    """What a request asks for, without its delivery details (reply address, deadline,
    resumed tokens): a resubmission asks the same; another request reusing the id does not."""
    return tuple(request.model_dump(exclude={"reply_to", "timeout_s", "resume_token_ids"}).values())


class EntryDesk:
    """The entry's front desk, mixed into `EntryRole`: admission (``max_in_flight``
    running, ``max_queued`` waiting), the journal of running requests, and repeats
    (redeliveries and resubmissions) of requests it has seen. Event loop only."""

    max_in_flight: int
    max_queued: int
    waiting: WaitingQueue
    journal: dict[str, JournalEntry]
    finished: OrderedDict[str, tuple[tuple[object, ...], ReplyMessage]]
    """(what was asked, final reply) of recent requests, by request id."""
    counters: Counter[str]
    _reply: Reply

    async def repeat(self, request: GenerateRequest | EmbedRequest) -> bool:
        """Handle a request id seen before; False for a new one.

        A QoS 1 redelivery of a request in flight is dropped; a resubmission (the client
        lost replies) of one in flight gets the tokens after those it holds again; one that
        already ended gets its final reply again. Each generated token stays one per index.
        """
        rid = request.request_id
        final = self.finished.get(rid)
        if final is not None and final[0] == asked_of(request):
            self.counters["requests_answered_again"] += 1
            self._reply(request.reply_to, final[1])
            return True
        waiting = self.waiting.get(rid)
        if waiting is not None:  # it waits for a slot: it has no tokens to resend yet
            if asked_of(waiting.request) != asked_of(request):
                self._reply(request.reply_to, RequestFailed(
                    request_id=rid, error="invalid_request", message=f"request {rid} is already queued"))  # fmt: skip
            else:
                self.counters["requests_duplicate" if getattr(request, "resume_token_ids", None) is None
                              else "requests_resynced"] += 1  # fmt: skip
                self.waiting.replace(request)
            return True
        entry = self.journal.get(rid)
        if entry is None:
            return False
        if asked_of(entry.request) != asked_of(request):
            self._reply(request.reply_to, RequestFailed(
                request_id=rid, error="invalid_request", message=f"request {rid} is already in flight"))  # fmt: skip
            return True
        resume = getattr(request, "resume_token_ids", None)
        if resume is None:
            self.counters["requests_duplicate"] += 1
            return True
        self.counters["requests_resynced"] += 1
        for index in range(len(resume), len(entry.generated)):
            self._reply(request.reply_to, TokenGenerated(
                request_id=rid, index=index, token_id=entry.generated[index], text=entry.texts[index]))  # fmt: skip
        return True

    def admit(self, request: GenerateRequest | EmbedRequest) -> Literal["start", "queued"] | RequestFailed:
        """``start``: run it now (it is journalled at once, so it counts against
        ``max_in_flight`` before its serve task runs); ``queued``: it waits for a slot
        (`take_waiting` starts it); else the typed refusal to send back (``busy``: the
        queue holds ``max_queued`` already).

        Event loop, no await: a burst taken from the subscription without yielding is
        counted exactly, one request at a time, in arrival order.
        """
        rid, in_flight, queued = request.request_id, len(self.journal), len(self.waiting)
        decision = decide(in_flight, queued, self.max_in_flight, self.max_queued)
        if decision == "start":
            self.journal[rid] = JournalEntry(request, [])
            return "start"
        if decision == "queue":
            self.waiting.push(request, time.perf_counter(), in_flight + queued)
            return "queued"
        return RequestFailed(request_id=rid, error="busy", message=(
            f"entry node has {in_flight} requests in flight and {queued} waiting (the bounds "
            f"{self.max_in_flight} and {self.max_queued}); retry later"))  # fmt: skip

    def take_waiting(self) -> list[GenerateRequest | EmbedRequest]:
        """Waiting requests that may start now, oldest first, each journalled (run each
        with `serve`); those whose deadline passed while they waited are answered busy."""
        now_s = time.perf_counter()
        start, expired = self.waiting.take(len(self.journal), self.max_in_flight, now_s)
        for item in expired:
            self.counters["refused_busy"] += 1
            self._reply(item.request.reply_to, RequestFailed(
                request_id=item.request.request_id, error="busy", message=(
                    f"waited {now_s - item.arrived_s:.1f} s for a slot ({item.ahead} requests ahead "
                    f"on arrival), past its deadline of {item.request.timeout_s:g} s")))  # fmt: skip
        for item in start:
            self.journal[item.request.request_id] = JournalEntry(item.request, [], arrived_s=item.arrived_s)
        return [item.request for item in start]

    def drop_waiting(self, why: str) -> None:
        """Answer every waiting request ``invalid_request`` with ``why`` (this node stopped
        being the entry: the client resubmits to the new one)."""
        for item in self.waiting.drain():
            self._reply(item.request.reply_to, RequestFailed(
                request_id=item.request.request_id, error="invalid_request", message=why[:1024]))  # fmt: skip
