"""The client side of the running system: `edgesplit generate/embed --broker URL`.

It reads the retained plan to find the entry node, subscribes to its own replies
topic, sends the request and streams the answer. Every wait has a deadline; nothing
answering becomes a one-line NoAnswer error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass

from shared.bus import Bus
from shared.config import BusSettings, load_settings
from shared.errors import Busy, ContextTooLong, NoAnswer, ServingError, StageTimedOut
from shared.messages import (
    EmbeddingReady,
    EmbedRequest,
    GenerateRequest,
    Plan,
    RequestFailed,
    RequestFinished,
    TokenGenerated,
)
from shared.process import first_edgesplit_error
from shared.topics import PLAN, REPLIES, REQUESTS

PLAN_WAIT_S = 3.0
_ERRORS: dict[str, type[ServingError]] = {
    "busy": Busy,
    "context_too_long": ContextTooLong,  # type: ignore[dict-item]
    "timeout": StageTimedOut,
}


@dataclass(frozen=True)
class ClientOptions:
    settings: BusSettings
    timeout_s: float = 120.0
    """Deadline for the whole request."""


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
        async with bus.subscribe(REPLIES, client=bus.origin) as replies:
            await bus.publish(REQUESTS, message, node=plan.entry_node)
            try:
                async with asyncio.timeout(options.timeout_s):
                    async for _, reply in replies:
                        if reply.request_id != message.request_id:
                            continue
                        if isinstance(reply, TokenGenerated):
                            if on_token is not None:
                                on_token(reply)
                        elif isinstance(reply, RequestFailed):
                            raise _ERRORS.get(reply.error, ServingError)(
                                f"{reply.error}: {reply.message}"
                            )
                        else:
                            return reply
            except TimeoutError:
                pass
    raise NoAnswer(
        f"no answer from entry node {plan.entry_node} within {options.timeout_s} s "
        f"(request {message.request_id})"
    )


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
        from services.cli_infer import _parse_ids

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


def _embed_remote(args: argparse.Namespace) -> int:
    """`edgesplit embed --broker URL --text ...`"""
    options = _options(args)

    def make(client: str) -> EmbedRequest:
        return EmbedRequest(request_id=secrets.token_hex(8), reply_to=client, text=args.text,  # type: ignore[arg-type]
                            timeout_s=options.timeout_s)  # fmt: skip

    result = _run(request(options, make))
    assert isinstance(result, EmbeddingReady)
    if args.json:
        print(json.dumps({"embedding": list(result.embedding)}))
    else:
        print(" ".join(f"{value:.6f}" for value in result.embedding))
    return 0
