"""The entry's replies to clients, sent in order by one task.

The decode loop queues a reply and goes on; the sender publishes each on the client's
reply topic (QoS 1) and never lets the loop wait for the broker's acknowledgement. A
`RequestFinished` goes once more to ``requests/finished``, where the orchestrator reads
the time per token of every generation without reading every client's token stream; that
copy carries counts and timings only (`RequestFinished.without_content`), never the
generated tokens or text, which go only to the client's own reply topic.

The queue is bounded (``max_queued``; it fills only while the broker takes publishes
slower than tokens come). Full, it drops a token reply, never a final one: a new
`TokenGenerated` is dropped, a final reply takes the place of the oldest queued token
reply (or, with none, of the oldest reply). Safe: a final `RequestFinished` carries
every token id, a client that sees a gap asks the entry to resend, and the entry keeps
final replies for a resubmission (entry.py, FINISHED_KEPT). Drops are counted.

Each reply is sealed (``mac``) with the reply key its request carried (`remember`, called
when a request arrives): only the entry that read the request knows that key, so the
client can tell its entry's replies from anyone else's (docs/SECURITY.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque

from shared.bus import Bus
from shared.errors import EdgesplitError
from shared.messages import EmbeddingReady, RequestFailed, RequestFinished, TokenGenerated
from shared.messages.requests import seal_reply
from shared.topics import FINISHED, REPLIES

log = logging.getLogger(__name__)
Reply = TokenGenerated | RequestFinished | EmbeddingReady | RequestFailed


REPLY_QUEUE = 4096
"""Replies a worker queues for the broker at most (see the module's note on overflow)."""
REPLY_KEYS_KEPT = 4096
"""Reply keys of the latest requests a worker remembers (the oldest is forgotten first)."""


class ReplySender:
    """A bounded queue of (client, reply) and the task that publishes it in order."""

    def __init__(self, node: str, max_queued: int = REPLY_QUEUE) -> None:
        self.node = node
        self.max_queued = max_queued
        self.dropped = 0
        """Replies dropped because the queue was full."""
        self._queue: deque[tuple[str, Reply]] = deque()
        self._ready = asyncio.Event()
        self._keys: OrderedDict[str, str] = OrderedDict()

    def remember(self, request_id: str, reply_key: str | None, *, new: bool = False) -> None:
        """Seal the replies of ``request_id`` with ``reply_key`` (None: send them unsealed).
        The first key given for a request stays (a client keeps one key per request; a
        later key under the same id cannot redirect the seal of a request in flight)
        unless ``new``: the entry took it as a new request under an id that ended before
        (a client may reuse its ids; that request's replies go to its own key)."""
        if reply_key is None:
            return
        if new:
            self._keys[request_id] = reply_key
        self._keys.setdefault(request_id, reply_key)
        self._keys.move_to_end(request_id)
        while len(self._keys) > REPLY_KEYS_KEPT:
            self._keys.popitem(last=False)

    def queued(self) -> list[tuple[str, Reply]]:
        """The replies waiting, oldest first (a copy)."""
        return list(self._queue)

    def queue(self, client: str, message: Reply) -> None:
        """Queue ``message`` for ``client``; returns at once (event loop only)."""
        if len(self._queue) >= self.max_queued:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("%s: reply queue full (%d): %d replies dropped so far", self.node,
                            self.max_queued, self.dropped)  # fmt: skip
            if isinstance(message, TokenGenerated):
                return
            oldest_token = next((i for i, (_, queued) in enumerate(self._queue)
                                 if isinstance(queued, TokenGenerated)), 0)  # fmt: skip
            del self._queue[oldest_token]
        self._queue.append((client, message))
        self._ready.set()

    async def _next(self) -> tuple[str, Reply]:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    async def run(self, bus: Bus) -> None:
        """Publish queued replies until cancelled; a reply the broker refuses is logged."""
        while True:
            client, message = await self._next()
            key = self._keys.get(message.request_id)
            if key is not None:
                message = seal_reply(message, key)
            try:
                await bus.publish(REPLIES, message, client=client)
                if isinstance(message, RequestFinished):  # numbers only: no tokens, no text
                    await bus.publish(FINISHED, message.without_content())
            except EdgesplitError as error:
                log.warning("%s: reply to %s lost: %s", self.node, client, error)
