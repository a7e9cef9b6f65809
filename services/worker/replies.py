"""The entry's replies to clients, sent in order by one task.

The decode loop queues a reply and goes on; the sender publishes each on the client's
reply topic (QoS 1) and never lets the loop wait for the broker's acknowledgement. A
`RequestFinished` goes once more to ``requests/finished``, where the orchestrator reads
the time per token of every generation without reading every client's token stream; that
copy carries counts and timings only (`RequestFinished.without_content`), never the
generated tokens or text, which go only to the client's own reply topic.
"""

from __future__ import annotations

import asyncio
import logging

from shared.bus import Bus
from shared.errors import EdgesplitError
from shared.messages import EmbeddingReady, RequestFailed, RequestFinished, TokenGenerated
from shared.topics import FINISHED, REPLIES

log = logging.getLogger(__name__)
Reply = TokenGenerated | RequestFinished | EmbeddingReady | RequestFailed


class ReplySender:
    """A queue of (client, reply) and the task that publishes it in order."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._queue: asyncio.Queue[tuple[str, Reply]] = asyncio.Queue()

    def queue(self, client: str, message: Reply) -> None:
        """Queue ``message`` for ``client``; returns at once (event loop only)."""
        self._queue.put_nowait((client, message))

    async def run(self, bus: Bus) -> None:
        """Publish queued replies until cancelled; a reply the broker refuses is logged."""
        while True:
            client, message = await self._queue.get()
            try:
                await bus.publish(REPLIES, message, client=client)
                if isinstance(message, RequestFinished):  # numbers only: no tokens, no text
                    await bus.publish(FINISHED, message.without_content())
            except EdgesplitError as error:
                log.warning("%s: reply to %s lost: %s", self.node, client, error)
