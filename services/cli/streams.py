"""In-process channels of the client library: the token stream of one generation, and
the retained topics shared by the requests of one long-lived connection.

A broker sends a topic's retained messages when a connection subscribes to its filter,
and a bus subscribes each filter once per connection: a second subscription to the plan
on the same `Bus` would never see the retained plan. `RetainedFeed` holds one
subscription per topic for the connection's lifetime, keeps the latest message per key
(the plan; each node's status) and gives every listener that snapshot first and each
later message after it, which is what a fresh subscription of its own would have seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from shared.errors import ServingError
from shared.messages import EmbeddingReady, RequestFinished, TokenGenerated
from shared.subscription import Subscription

P = TypeVar("P")


class FeedListener(Generic[P]):
    """One listener's messages, as ``(params, message)`` pairs like a subscription's."""

    def __init__(self, snapshot: list[P]) -> None:
        self._queue: asyncio.Queue[P] = asyncio.Queue()
        for message in snapshot:
            self._queue.put_nowait(message)

    def put(self, message: P) -> None:
        self._queue.put_nowait(message)

    def __aiter__(self) -> FeedListener[P]:
        return self

    async def __anext__(self) -> tuple[dict[str, str], P]:
        return {}, await self._queue.get()


class RetainedFeed(Generic[P]):
    """The latest message per key of one retained topic, fanned out to listeners.

    ``key(params, message)`` names what a message replaces (one plan; one status per
    node). ``run()`` follows the subscription until cancelled; listeners register and
    leave synchronously, so no message falls between the snapshot and the live feed.
    """

    def __init__(self, subscription: Subscription[P], key: Callable[[dict[str, str], P], str],
                 accept: Callable[[P], bool] | None = None) -> None:  # fmt: skip
        """``accept`` (e.g. a plan's signature check, which counts what it refuses) drops a
        message before anyone sees it."""
        self._subscription, self._key, self._accept = subscription, key, accept
        self._latest: dict[str, P] = {}
        self._listeners: set[FeedListener[P]] = set()
        self._arrived = asyncio.Event()

    async def run(self) -> None:
        """Follow the topic until cancelled or the subscription closes."""
        async for params, message in self._subscription:
            if self._accept is not None and not self._accept(message):
                continue
            self._latest[self._key(params, message)] = message
            for listener in self._listeners:
                listener.put(message)
            self._arrived.set()

    def latest(self, key: str) -> P | None:
        """The latest message under ``key``, or None when none arrived yet."""
        return self._latest.get(key)

    async def wait_for(self, key: str, wait_s: float) -> P | None:
        """The latest message under ``key``, waiting up to ``wait_s`` seconds for one."""
        try:
            async with asyncio.timeout(wait_s):
                while key not in self._latest:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            return None
        return self._latest[key]

    @contextmanager
    def listen(self) -> Iterator[FeedListener[P]]:
        """A listener that gets the current snapshot, then every later message."""
        listener = FeedListener(list(self._latest.values()))
        self._listeners.add(listener)
        try:
            yield listener
        finally:
            self._listeners.discard(listener)



Answer = RequestFinished | EmbeddingReady


class TokenStream:
    """One generation's tokens as they arrive: ``async for token in stream``.

    Yields `TokenGenerated` (``index``, ``token_id``, ``text``) once each, in index order,
    whatever resubmissions happened; after the last one ``result`` holds the entry's
    `RequestFinished` (all token ids, the text, ``ttft_s`` and ``tpot_s`` in seconds).
    Iterating raises what the request raised: Busy, ContextTooLong, StageTimedOut,
    NoFeasiblePlan or ServingError for a typed refusal, NoAnswer past the deadline, and
    ServingError when the request was stopped (``aclose`` or the client closed).

    ``start(on_token)`` starts the request (a task the client owns) and is called at once.
    """

    def __init__(self, start: Callable[[Callable[[TokenGenerated], None]], asyncio.Task[Answer]]) -> None:
        self.result: RequestFinished | None = None
        self._tokens: asyncio.Queue[TokenGenerated | None] = asyncio.Queue()
        self._task = start(self._tokens.put_nowait)
        self._task.add_done_callback(lambda _: self._tokens.put_nowait(None))

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenGenerated:
        token = await self._tokens.get()
        if token is not None:
            return token
        self._tokens.put_nowait(None)  # iterating again ends at once
        if self._task.cancelled():
            raise ServingError("the request was stopped before it finished (stream or client closed)")
        final = self._task.result()  # raises the request's error
        assert isinstance(final, RequestFinished)
        self.result = final
        raise StopAsyncIteration

    async def collect(self) -> RequestFinished:
        """Consume the remaining tokens; the final `RequestFinished` (raises as iterating)."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def aclose(self) -> None:
        """Stop the request: its tokens are no longer wanted."""
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])  # a cancellation of our own still propagates
