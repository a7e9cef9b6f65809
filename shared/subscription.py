"""Typed in-process channels of the bus: what a subscriber receives and how it queues.

`Subscription` is a bounded queue of the `Delivery` items matching one topic filter;
its topic's overflow policy decides what a full queue drops (each drop is counted and
logged). `Announcement` describes a retained birth message or Last Will.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from shared import codec
from shared.errors import BusError
from shared.topics import Overflow, Topic

log = logging.getLogger("shared.bus")
P = TypeVar("P")


@dataclass(frozen=True)
class Announcement(Generic[P]):
    """A retained message the bus publishes for its owner: the birth or the Last Will."""

    topic: Topic[P]
    message: P
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery(Generic[P]):
    """One received message. Unpacks as ``(params, message)``; ``envelope`` is None for frames."""

    params: dict[str, str]
    message: P
    envelope: codec.Envelope[Any] | None
    retained: bool

    def __iter__(self) -> Any:
        return iter((self.params, self.message))


class Subscription(Generic[P]):
    """A bounded in-process queue of the messages matching one topic filter.

    Async-iterate it for `Delivery` items; iteration ends when it or the bus closes.
    ``async with`` waits until the broker confirmed the subscription (BusError after
    ``confirm_timeout_s`` seconds) and closes it on exit. ``counters``: the bus's counters
    (overflow drops are counted there); ``on_close``: called once, when it closes.
    """

    def __init__(
        self,
        topic: Topic[P],
        params: dict[str, str],
        filter_: str,
        size: int,
        *,
        counters: Counter[str],
        confirm_timeout_s: float,
        on_close: Callable[[Subscription[Any]], None],
    ) -> None:
        self.topic, self.params, self.filter = topic, params, filter_
        self.active = asyncio.Event()
        """Set while the broker has confirmed this subscription on the current connection."""
        self.dropped = 0
        self._size, self._counters = size, counters
        self._confirm_timeout_s, self._on_close = confirm_timeout_s, on_close
        self._items: deque[Delivery[P]] = deque()
        self._readable = asyncio.Event()
        self._closed = False

    def matches(self, params: dict[str, str]) -> bool:
        return all(params.get(name) == value for name, value in self.params.items())

    def offer(self, delivery: Delivery[P]) -> None:
        """Queue a delivery without blocking; applies the topic's overflow policy."""
        if len(self._items) >= self._size:
            self.dropped += 1
            self._counters[f"overflow:{self.topic.pattern}"] += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("subscription %s is full (%d): %s, %d dropped so far", self.filter,
                            self._size, self.topic.overflow.value, self.dropped)  # fmt: skip
            if self.topic.overflow is Overflow.DROP_NEWEST:
                return
            self._items.popleft()
        self._items.append(delivery)
        self._readable.set()

    def __aiter__(self) -> Subscription[P]:
        return self

    async def __anext__(self) -> Delivery[P]:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        return self._items.popleft()

    async def get(self) -> Delivery[P]:
        """The next delivery; raises BusError if the subscription is closed."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise BusError(f"subscription {self.filter} is closed") from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._readable.set()
            self._on_close(self)

    async def __aenter__(self) -> Subscription[P]:
        timeout_s = self._confirm_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self.active.wait()
        except TimeoutError:
            self.close()
            raise BusError(
                f"broker did not confirm subscription {self.filter} in {timeout_s} s"
            ) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
