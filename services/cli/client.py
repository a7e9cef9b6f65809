"""The client library of the running system (``edgesplit generate/embed --broker URL``
is built on it; the command-line handlers are in services/cli/infer.py).

From Python, without argparse::

    async with Client("mqtt://127.0.0.1:1883") as client:
        stream = client.generate("The road ahead", max_new_tokens=16)
        async for token in stream:
            print(token.text, end="")
        print(stream.result.tpot_s)
        vector = await client.embed("a sentence")  # with a BERT model served

`request(options, make_request, on_token)` is the one-shot form (its own connection).
A request reads the retained plan to find the entry node, subscribes to its own replies
topic, sends the request and streams the answer. Every wait has a deadline; nothing
answering becomes a one-line NoAnswer error.

Faults are hidden from the caller: the caller sees each token once, in order. When the
entry goes down (its Last Will, the monitor's NodeDown), a new plan names another entry,
or the replies go quiet for ``resync_after_s`` (a reply lost while the broker restarted),
the client resubmits the request with the tokens it already has (``resume_token_ids``)
to the entry of the current plan: a live entry that still runs the request resends what
the client misses, one that finished it resends the final reply, a new one continues
after the client's tokens. Duplicate and out-of-order tokens are put right by index.

Plans are checked before they are followed (`signing.receiver_gate`): on the secure
profile (``role_keys_dir``) only a plan the broadcaster's key signed, with a configured
cluster key only one that key signed; a refused plan (``Plan_unsigned``, ``Plan_forged``,
``Plan_role``) is counted (`Client.refusals`), logged once, and never used to pick an entry.
The monitor's NodeDown / NodeJoined pass the same gate (only the monitor's key, or the
cluster key), one issued more than ``max_message_age_s`` ago is stale, and one older
than the newest seen for its node is a replay: a refused one (``NodeDown_forged``,
``NodeDown_role``, ``NodeDown_stale``, ``NodeDown_replayed``, ...) is counted and
neither makes a request wait for its entry nor resubmits it.
Each request carries a fresh reply key (``reply_key``) that only its entry reads; a reply
without a valid MAC under it (another identity writing into this client's reply topic)
is dropped and counted as ``Reply_forged``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from services.cli.streams import RetainedFeed, TokenStream
from shared.bus import Bus
from shared.config import BusSettings, load_settings
from shared.errors import (
    BusError,
    Busy,
    ConfigError,
    ContextTooLong,
    EdgesplitError,
    NoAnswer,
    Overloaded,
    ServingError,
    StageTimedOut,
)
from shared.ids import RequestId
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
from shared.messages.requests import Reply, reply_sealed
from shared.security.signing import ControlGate, receiver_gate
from shared.topics import NODE_STATUS, PLAN, PROFILE_EVENTS, REPLIES, REQUESTS

log = logging.getLogger(__name__)
PLAN_WAIT_S = 3.0
_RECONNECTED = object()
"""Inbox marker: the client's bus reconnected."""
INBOX_SIZE = 1024
"""Messages a request's inbox holds; full, its pumps wait, and the bus subscriptions
behind them apply their topics' overflow policies (shared/topics.py)."""


class NoFeasiblePlan(ServingError):
    """A node was lost and no plan without it exists (no capacity, no trusted node)."""


_ERRORS: dict[str, type[ServingError]] = {
    "busy": Busy,
    "context_too_long": ContextTooLong,  # type: ignore[dict-item]
    "timeout": StageTimedOut,
    "no_plan": NoFeasiblePlan,
    "overloaded": Overloaded,
}


DEADLINE_GRACE_S = 3.0
"""After the request's deadline, how long the client still waits for the entry's own
answer: the entry enforces the same deadline (counted from when it received the request,
a little later) and answers with a typed ``timeout``; a client that gave up first called
a request the system did answer lost (seen in a scenario run: 10 typed timeouts and one
NoAnswer at the same deadline)."""


@dataclass(frozen=True)
class ClientOptions:
    settings: BusSettings
    timeout_s: float = 120.0
    """Deadline for the whole request."""
    resync_after_s: float = 3.0
    """Resubmit (with the tokens held) when no reply came for this long."""
    entry_down_wait_s: float | None = None
    """When set: a request whose entry is down and that sees neither the entry back nor a
    plan with another entry for this long ends with NoFeasiblePlan (typed) instead of
    waiting out ``timeout_s``. None (the default): it waits, as a restarted entry may still
    come back (the scenario runner sets 20 s: docs/SCENARIOS.md)."""


def _no_system(bus: Bus, wait_s: float) -> NoAnswer:
    return NoAnswer(
        f"no edgesplit system at {bus.url} (cluster {bus.cluster!r}): no plan published "
        f"within {wait_s} s; is `edgesplit up` running?"
    )


async def current_plan(bus: Bus, wait_s: float = PLAN_WAIT_S, gate: ControlGate | None = None) -> Plan:
    """The retained plan of the bus's cluster (one ``gate`` accepts); NoAnswer if none
    arrives within ``wait_s``."""
    async with bus.subscribe(PLAN) as plans:
        try:
            async with asyncio.timeout(wait_s):
                while True:
                    plan: Plan = (await plans.get()).message
                    if gate is None or gate.signed(plan):
                        return plan
        except TimeoutError:
            refused = f"; refused: {gate.refusals()}" if gate is not None and gate.refusals() else ""
            raise NoAnswer(f"{_no_system(bus, wait_s)}{refused}") from None


async def request(
    options: ClientOptions,
    make_request: Callable[[str], GenerateRequest | EmbedRequest],
    on_token: Callable[[TokenGenerated], None] | None = None,
) -> RequestFinished | EmbeddingReady:
    """Send one request to the current entry node and wait for its final answer.

    Raises Busy, ContextTooLong, StageTimedOut or ServingError for a typed refusal,
    NoAnswer when nothing answers within the deadline, BrokerUnavailable without a broker.
    """
    gate = receiver_gate(options.settings, "client")
    async with Bus(options.settings) as bus:
        plan = await current_plan(bus, gate=gate)
        message = make_request(bus.origin)
        async with (
            bus.subscribe(REPLIES, client=bus.origin) as replies,
            bus.subscribe(PLAN) as plans,
            bus.subscribe(NODE_STATUS) as statuses,
            bus.subscribe(PROFILE_EVENTS) as events,
        ):
            session = _Session(bus, options, message, plan, on_token, gate)
            try:
                return await session.run(replies, plans, statuses, events)
            except NoAnswer as error:
                if session.counters:
                    raise NoAnswer(f"{error}; refused: {dict(session.counters)}") from None
                raise


def _validated(build: Callable[[], Any]) -> Any:
    """``build()``, a pydantic error turned into ConfigError naming the field."""
    try:
        return build()
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "request"
        raise ConfigError(f"{field}: {first['msg']}") from None


class _Session:
    """One request's conversation with whichever entry serves it."""

    def __init__(self, bus: Bus, options: ClientOptions, message: GenerateRequest | EmbedRequest,
                 plan: Plan, on_token: Callable[[TokenGenerated], None] | None,
                 gate: ControlGate | None = None, counters: Counter[str] | None = None) -> None:  # fmt: skip
        if message.reply_key is None:  # a fresh key per request: only its entry will read it
            message = message.model_copy(update={"reply_key": secrets.token_hex(32)})
        self.bus, self.options, self.message = bus, options, message
        self.plan, self.on_token, self.gate = plan, on_token, gate
        self.counters: Counter[str] = counters if counters is not None else Counter()
        """``Reply_forged``: replies to this request without a valid MAC under its key."""
        self.entry_down = False
        self.entry_down_since: float | None = None
        self.tokens: list[int] = []
        self._ahead: dict[int, TokenGenerated] = {}  # tokens after a gap, by index
        self._inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=INBOX_SIZE)
        self.deadline = 0.0
        """Loop time (s) by which the request must be answered; `run` sets it."""
        self.resubmissions = 0

    async def run(self, *subscriptions: AsyncIterable[Any]) -> RequestFinished | EmbeddingReady:
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

    async def _pump(self, subscription: AsyncIterable[Any]) -> None:
        async for _, message in subscription:
            await self._inbox.put(message)

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
            await self._inbox.put(_RECONNECTED)

    async def _converse(self) -> RequestFinished | EmbeddingReady:
        loop = asyncio.get_running_loop()
        while True:
            left_s = self.deadline - loop.time()
            waited = loop.time() - self.entry_down_since if self.entry_down_since is not None else 0.0
            limit_s = self.options.entry_down_wait_s
            if self.entry_down and limit_s is not None and waited > limit_s:
                raise NoFeasiblePlan(f"no_plan: entry node {self.plan.entry_node} is down and no plan "
                                     f"without it came within {limit_s:g} s "
                                     f"(request {self.message.request_id})")  # fmt: skip
            if left_s <= -DEADLINE_GRACE_S:
                raise NoAnswer(f"no answer from entry node {self.plan.entry_node} within "
                               f"{self.options.timeout_s} s (request {self.message.request_id})")  # fmt: skip
            try:
                async with asyncio.timeout(min(left_s + DEADLINE_GRACE_S, self.options.resync_after_s)):
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
            if message.epoch > self.plan.epoch and (self.gate is None or self.gate.signed(message)):
                moved = message.entry_node != self.plan.entry_node
                self.plan = message
                if moved or self.entry_down:
                    self.entry_down = False
                    await self._send()
        elif isinstance(message, NodeStatus | NodeDown | NodeJoined):
            if self.gate is not None and not (self.gate.signed(message) and self.gate.current(message)):
                return None  # a forged or replayed NodeDown of the entry must not make it wait or fail
            if message.node == self.plan.entry_node:
                down = isinstance(message, NodeDown) or (isinstance(message, NodeStatus) and message.state == "offline")
                if down and not self.entry_down:
                    log.info("entry %s is down; waiting for it or a new entry", message.node)
                    self.entry_down_since = asyncio.get_running_loop().time()
                elif not down and self.entry_down:
                    await self._send()  # the entry is back (restarted): resubmit
                self.entry_down = down
        elif getattr(message, "request_id", None) != self.message.request_id:
            pass
        elif isinstance(message, Reply) and not self._sealed(message):
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

    def _sealed(self, reply: Reply) -> bool:
        """True when ``reply`` carries a valid MAC under this request's key; counts and logs
        (first, then every 100th) one that does not."""
        assert self.message.reply_key is not None
        if reply_sealed(reply, self.message.reply_key):
            return True
        self.counters["Reply_forged"] += 1
        if self.counters["Reply_forged"] % 100 == 1:
            log.warning("request %s: dropped a %s without its entry's MAC (%d so far)", self.message.request_id,
                        reply.kind, self.counters["Reply_forged"])  # fmt: skip
        return False

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


class Client:
    """The running system from Python: one broker connection for many requests.

    ``async with Client(broker_url) as client`` connects (BrokerUnavailable without a
    broker; ConfigError for a bad URL); ``client.generate(...)`` streams tokens and
    ``await client.embed(text)`` returns an embedding. Requests may run concurrently;
    each keeps the CLI's guarantees: resubmission when the entry or the broker goes away,
    every token once and in order, the whole request within ``timeout_s`` seconds.
    The constructor does no I/O. Leaving the block cancels requests still running.
    """

    def __init__(self, broker_url: str | None = None, *, cluster: str | None = None,
                 timeout_s: float = 120.0, resync_after_s: float = 3.0,
                 options: ClientOptions | None = None) -> None:  # fmt: skip
        """``options`` (settings and deadlines, e.g. a test's cluster) replaces the rest."""
        if options is None:
            settings = load_settings(BusSettings, {"broker_url": broker_url, "cluster": cluster})
            options = ClientOptions(settings, timeout_s=timeout_s, resync_after_s=resync_after_s)
        self.options = options
        self._gate = receiver_gate(options.settings, "client")
        self._counters: Counter[str] = Counter()
        """Replies refused (``Reply_forged``), all requests of this client together."""
        self._exit = AsyncExitStack()
        self._bus: Bus | None = None
        self._plans: RetainedFeed[Plan] | None = None
        self._statuses: RetainedFeed[NodeStatus] | None = None
        self._running: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Client:
        try:
            self._bus = await self._exit.enter_async_context(Bus(self.options.settings))
            plans = await self._exit.enter_async_context(self._bus.subscribe(PLAN))
            statuses = await self._exit.enter_async_context(self._bus.subscribe(NODE_STATUS))
        except BaseException:
            await self._exit.aclose()
            raise
        self._plans = RetainedFeed(plans, lambda _params, _plan: "plan",
                                   accept=self._gate.signed if self._gate is not None else None)  # fmt: skip
        self._statuses = RetainedFeed(statuses, lambda params, _status: params["node"])
        for feed in (self._plans, self._statuses):
            self._track(asyncio.get_running_loop().create_task(feed.run(), name="retained-feed"))
        return self

    @property
    def bus(self) -> Bus:
        """The client's broker connection (inside ``async with``), for a caller that
        follows more topics over it (the gateway's dashboard)."""
        if self._bus is None:
            raise BusError("the client is not connected (use it inside `async with`)")
        return self._bus

    async def __aexit__(self, *exc: object) -> None:
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.wait(tasks)  # a cancellation of our own still propagates
        finally:
            self._bus = None
            await asyncio.shield(self._exit.aclose())  # the connection closes even then

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 timeout_s: float | None = None) -> TokenStream:  # fmt: skip
        """Start generating after ``prompt`` (text, or token ids); the request is sent now.

        Greedy unless ``temperature`` > 0 (then nucleus ``top_p``, seeded by ``seed``);
        ``timeout_s`` (default the client's) bounds the whole request, in seconds.

        Raises:
            ConfigError: an argument the request does not accept (the message names it),
                or the client is not connected (use ``async with``).
        """
        bus = self._connected()
        text = prompt if isinstance(prompt, str) else None
        ids = None if isinstance(prompt, str) else tuple(prompt)
        message = _validated(lambda: GenerateRequest(
            request_id=_new_request_id(), reply_to=bus.origin, prompt=text, token_ids=ids,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            timeout_s=timeout_s or self.options.timeout_s))  # fmt: skip
        return TokenStream(lambda on_token: self._track(asyncio.get_running_loop().create_task(
            self._serve(bus, message, timeout_s, on_token), name=f"generate-{message.request_id}")))

    async def embed(self, text: str, *, timeout_s: float | None = None) -> tuple[float, ...]:
        """The embedding of ``text`` (mean-pooled, L2-normalised for BERT models).

        Raises ConfigError for a bad argument, the typed refusals and NoAnswer as
        `TokenStream` does.
        """
        bus = self._connected()
        message = _validated(lambda: EmbedRequest(
            request_id=_new_request_id(), reply_to=bus.origin, text=text,
            timeout_s=timeout_s or self.options.timeout_s))  # fmt: skip
        final = await self._serve(bus, message, timeout_s, None)
        assert isinstance(final, EmbeddingReady)
        return final.embedding

    def current_plan(self) -> Plan | None:
        """The latest retained plan this connection has seen (None before the first one,
        or when not connected): what a request would be sent by."""
        return self._plans.latest("plan") if self._plans is not None else None

    def refusals(self) -> dict[str, int]:
        """Plans (``Plan_unsigned``, ``Plan_forged``, ``Plan_role``), node events
        (``NodeDown_forged``, ``NodeDown_stale``, ``NodeDown_replayed``, ...) and replies (``Reply_forged``)
        refused so far: counts."""
        plans = self._gate.refusals() if self._gate is not None else {}
        return {**plans, **self._counters}

    def _connected(self) -> Bus:
        if self._bus is None:
            raise ConfigError("the client is not connected: use `async with Client(...)`")
        return self._bus

    def _track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Keep a reference until ``task`` ends (cancelled on exit), never a bare task."""
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def _serve(self, bus: Bus, message: GenerateRequest | EmbedRequest, timeout_s: float | None,
                     on_token: Callable[[TokenGenerated], None] | None) -> RequestFinished | EmbeddingReady:  # fmt: skip
        """One request on the shared connection: subscribe, then the session with the
        retained plan and statuses from the feeds (a fresh subscription would miss them)."""
        assert self._plans is not None and self._statuses is not None
        options = self.options
        if timeout_s is not None:
            options = ClientOptions(options.settings, timeout_s, options.resync_after_s)
        async with (
            bus.subscribe(REPLIES, client=bus.origin) as replies,
            bus.subscribe(PROFILE_EVENTS) as events,
        ):
            plan = await self._plans.wait_for("plan", PLAN_WAIT_S)
            if plan is None:
                raise _no_system(bus, PLAN_WAIT_S)
            with self._plans.listen() as plans, self._statuses.listen() as statuses:
                session = _Session(bus, options, message, plan, on_token, self._gate, self._counters)
                return await session.run(replies, plans, statuses, events)


def _new_request_id() -> RequestId:
    return RequestId(secrets.token_hex(8))
