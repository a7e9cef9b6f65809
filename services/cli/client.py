"""The client side of the running system: `edgesplit generate/embed --broker URL`.

It reads the retained plan to find the entry node, subscribes to its own replies
topic, sends the request and streams the answer. Every wait has a deadline; nothing
answering becomes a one-line NoAnswer error.

Faults are hidden from the caller: the caller sees each token once, in order. When the
entry goes down (its Last Will, the monitor's NodeDown), a new plan names another entry,
or the replies go quiet for ``resync_after_s`` (a reply lost while the broker restarted),
the client resubmits the request with the tokens it already has (``resume_token_ids``)
to the entry of the current plan: a live entry that still runs the request resends what
the client misses, one that finished it resends the final reply, a new one continues
after the client's tokens. Duplicate and out-of-order tokens are put right by index.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shared.bus import Bus, Subscription
from shared.config import BusSettings, load_settings
from shared.errors import (
    Busy,
    ConfigError,
    ContextTooLong,
    EdgesplitError,
    NoAnswer,
    ServingError,
    StageTimedOut,
)
from shared.messages import (
    EmbeddingReady,
    EmbedRequest,
    GenerateRequest,
    NodeDown,
    NodeJoined,
    NodeStatus,
    Plan,
    RequestFailed,
    RequestFinished,
    TokenGenerated,
)
from shared.process import first_edgesplit_error
from shared.topics import NODE_STATUS, PLAN, PROFILE_EVENTS, REPLIES, REQUESTS

log = logging.getLogger(__name__)
PLAN_WAIT_S = 3.0
_RECONNECTED = object()
"""Inbox marker: the client's bus reconnected."""


class NoFeasiblePlan(ServingError):
    """A node was lost and no plan without it exists (no capacity, no trusted node)."""


_ERRORS: dict[str, type[ServingError]] = {
    "busy": Busy,
    "context_too_long": ContextTooLong,  # type: ignore[dict-item]
    "timeout": StageTimedOut,
    "no_plan": NoFeasiblePlan,
}


@dataclass(frozen=True)
class ClientOptions:
    settings: BusSettings
    timeout_s: float = 120.0
    """Deadline for the whole request."""
    resync_after_s: float = 3.0
    """Resubmit (with the tokens held) when no reply came for this long."""


async def current_plan(bus: Bus, wait_s: float = PLAN_WAIT_S) -> Plan:
    """The retained plan of the bus's cluster; NoAnswer if none arrives within ``wait_s``."""
    async with bus.subscribe(PLAN) as plans:
        try:
            async with asyncio.timeout(wait_s):
                return (await plans.get()).message
        except TimeoutError:
            raise NoAnswer(
                f"no edgesplit system at {bus.url} (cluster {bus.cluster!r}): no plan published "
                f"within {wait_s} s; is `edgesplit up` running?"
            ) from None


async def request(
    options: ClientOptions,
    make_request: Callable[[str], GenerateRequest | EmbedRequest],
    on_token: Callable[[TokenGenerated], None] | None = None,
) -> RequestFinished | EmbeddingReady:
    """Send one request to the current entry node and wait for its final answer.

    Raises Busy, ContextTooLong, StageTimedOut or ServingError for a typed refusal,
    NoAnswer when nothing answers within the deadline, BrokerUnavailable without a broker.
    """
    async with Bus(options.settings) as bus:
        plan = await current_plan(bus)
        message = make_request(bus.origin)
        async with (
            bus.subscribe(REPLIES, client=bus.origin) as replies,
            bus.subscribe(PLAN) as plans,
            bus.subscribe(NODE_STATUS) as statuses,
            bus.subscribe(PROFILE_EVENTS) as events,
        ):
            session = _Session(bus, options, message, plan, on_token)
            return await session.run(replies, plans, statuses, events)


class _Session:
    """One request's conversation with whichever entry serves it."""

    def __init__(self, bus: Bus, options: ClientOptions, message: GenerateRequest | EmbedRequest,
                 plan: Plan, on_token: Callable[[TokenGenerated], None] | None) -> None:  # fmt: skip
        self.bus, self.options, self.message = bus, options, message
        self.plan, self.on_token = plan, on_token
        self.entry_down = False
        self.tokens: list[int] = []
        self._ahead: dict[int, TokenGenerated] = {}  # tokens after a gap, by index
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.deadline = 0.0
        """Loop time (s) by which the request must be answered; `run` sets it."""
        self.resubmissions = 0

    async def run(self, *subscriptions: Subscription[Any]) -> RequestFinished | EmbeddingReady:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.options.timeout_s
        pumps = [asyncio.create_task(self._pump(sub)) for sub in subscriptions]
        pumps.append(asyncio.create_task(self._reconnects()))
        try:
            await self._send(first=True)
            return await self._converse()
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, subscription: Subscription[Any]) -> None:
        async for _, message in subscription:
            self._inbox.put_nowait(message)

    async def _reconnects(self) -> None:
        """After the bus reconnects (the broker restarted), resubmit at once: replies sent
        while it was away are lost."""
        seen = self.bus.sessions
        while True:
            try:
                await self.bus.wait_ready(min_sessions=seen + 1, timeout_s=3600.0)
            except EdgesplitError:
                continue
            seen = self.bus.sessions
            self._inbox.put_nowait(_RECONNECTED)

    async def _converse(self) -> RequestFinished | EmbeddingReady:
        loop = asyncio.get_running_loop()
        while True:
            left_s = self.deadline - loop.time()
            if left_s <= 0:
                raise NoAnswer(f"no answer from entry node {self.plan.entry_node} within "
                               f"{self.options.timeout_s} s (request {self.message.request_id})")  # fmt: skip
            try:
                async with asyncio.timeout(min(left_s, self.options.resync_after_s)):
                    message = await self._inbox.get()
            except TimeoutError:
                if loop.time() < self.deadline:
                    await self._send()  # quiet too long: a reply (or the request) was lost
                continue
            if message is _RECONNECTED:
                await self._send()
                continue
            final = await self.handle(message)
            if final is not None:
                return final

    async def handle(self, message: Any) -> RequestFinished | EmbeddingReady | None:
        """One incoming message; the final answer when it is one."""
        if isinstance(message, Plan):
            if message.epoch > self.plan.epoch:
                moved = message.entry_node != self.plan.entry_node
                self.plan = message
                if moved or self.entry_down:
                    self.entry_down = False
                    await self._send()
        elif isinstance(message, NodeStatus | NodeDown | NodeJoined):
            if message.node == self.plan.entry_node:
                down = isinstance(message, NodeDown) or (isinstance(message, NodeStatus) and message.state == "offline")
                if down and not self.entry_down:
                    log.info("entry %s is down; waiting for it or a new entry", message.node)
                elif not down and self.entry_down:
                    await self._send()  # the entry is back (restarted): resubmit
                self.entry_down = down
        elif getattr(message, "request_id", None) != self.message.request_id:
            pass
        elif isinstance(message, TokenGenerated):
            await self._token(message)
        elif isinstance(message, RequestFailed):
            if message.error == "invalid_request" and "not the entry" in message.message:
                return None  # a plan change raced the request: the new plan resubmits it
            raise _ERRORS.get(message.error, ServingError)(f"{message.error}: {message.message}")
        elif isinstance(message, RequestFinished):
            for index, token_id in enumerate(message.token_ids[len(self.tokens) :], len(self.tokens)):
                await self._token(self._ahead.get(index) or TokenGenerated(
                    request_id=message.request_id, index=index, token_id=token_id, text=""))  # fmt: skip
            return message
        elif isinstance(message, EmbeddingReady):
            return message
        return None

    async def _token(self, token: TokenGenerated) -> None:
        """Deliver tokens in index order, each once; a gap asks the entry to resend."""
        if token.index < len(self.tokens):
            return  # a duplicate (redelivery, or two entries racing)
        self._ahead[token.index] = token
        if token.index > len(self.tokens) and len(self._ahead) == 1:
            await self._send()  # the first token after a gap: ask for the missing ones
        while len(self.tokens) in self._ahead:
            ready = self._ahead.pop(len(self.tokens))
            self.tokens.append(ready.token_id)
            if self.on_token is not None:
                self.on_token(ready)

    async def _send(self, first: bool = False) -> None:
        """(Re)submit the request to the current plan's entry, unless it is down."""
        if self.entry_down:
            return
        message: Any = self.message
        if not first:
            self.resubmissions += 1
            left_s = max(0.1, self.deadline - asyncio.get_running_loop().time())
            update: dict[str, Any] = {"timeout_s": left_s}
            if isinstance(message, GenerateRequest):
                update["resume_token_ids"] = tuple(self.tokens)
            message = message.model_copy(update=update)
        try:
            if not first:
                log.info("request %s: resubmitted to %s with %d tokens", message.request_id,
                         self.plan.entry_node, len(self.tokens))  # fmt: skip
            await self.bus.publish(REQUESTS, message, node=self.plan.entry_node)
        except EdgesplitError as error:  # the broker is away: the next quiet period retries
            if first:
                raise
            log.info("resubmission of %s not sent: %s", message.request_id, error)


def _run(coroutine: object) -> object:
    try:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    except BaseExceptionGroup as group:
        found = first_edgesplit_error(group)
        if found is None:
            raise
        raise found from None


def _options(args: argparse.Namespace) -> ClientOptions:
    settings = load_settings(
        BusSettings, {"broker_url": args.broker, "cluster": getattr(args, "cluster", None)}
    )
    return ClientOptions(settings, timeout_s=getattr(args, "timeout_s", None) or 120.0)


def _generate_remote(args: argparse.Namespace) -> int:
    """`edgesplit generate --broker URL ...`"""
    token_ids = None
    if args.prompt_ids:
        from services.cli.infer import _parse_ids

        token_ids = tuple(_parse_ids(args.prompt_ids, "--prompt-ids"))
    options = _options(args)

    def make(client: str) -> GenerateRequest:
        return GenerateRequest(
            request_id=secrets.token_hex(8),  # type: ignore[arg-type]
            reply_to=client,
            prompt=None if token_ids is not None else args.prompt,
            token_ids=token_ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            timeout_s=options.timeout_s,
        )

    _checked(make)

    def show(token: TokenGenerated) -> None:
        print(token.text, end="", flush=True)

    result = _run(request(options, make, None if args.json else show))
    assert isinstance(result, RequestFinished)
    if args.json:
        print(json.dumps({"token_ids": list(result.token_ids), "text": result.text,
                          "ttft_s": result.ttft_s, "tpot_s": result.tpot_s}))  # fmt: skip
    else:
        print(flush=True)
        print(f"[{len(result.token_ids)} tokens, ttft {result.ttft_s * 1e3:.0f} ms, "
              f"tpot {result.tpot_s * 1e3:.1f} ms]", file=sys.stderr)  # fmt: skip
    return 0


_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_p": "--top-p",
          "seed": "--seed", "prompt": "prompt", "token_ids": "--prompt-ids", "text": "--text",
          "timeout_s": "--timeout"}  # fmt: skip


def _checked(make: Callable[[str], GenerateRequest | EmbedRequest]) -> None:
    """Build the request once before connecting, so a bad option is one line (ConfigError)."""
    try:
        make("check")
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"{_FLAGS.get(field, field)}: {first['msg']}") from None


def _embed_remote(args: argparse.Namespace) -> int:
    """`edgesplit embed --broker URL --text ...`"""
    options = _options(args)

    def make(client: str) -> EmbedRequest:
        return EmbedRequest(request_id=secrets.token_hex(8), reply_to=client, text=args.text,  # type: ignore[arg-type]
                            timeout_s=options.timeout_s)  # fmt: skip

    _checked(make)
    result = _run(request(options, make))
    assert isinstance(result, EmbeddingReady)
    if args.json:
        print(json.dumps({"embedding": list(result.embedding)}))
    else:
        print(" ".join(f"{value:.6f}" for value in result.embedding))
    return 0
