"""The OpenAI-compatible HTTP API (Starlette): /v1/models, /v1/completions,
/v1/chat/completions and /v1/embeddings, streaming with server-sent events.

Every request goes to the running system through the client library (one shared broker
connection); the gateway computes nothing. A streamed answer waits for its first token
before it sends its headers, so a refusal (busy, prompt too long, no plan) is still an
HTTP error in OpenAI's shape; an error after the first token ends the stream with an
``error`` event. Each streamed choice carries ``token_ids`` (the generated token's id,
an extension as vLLM's ``return_token_ids``) so a client can check tokens exactly.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.cli.client import Client
from services.gateway.chat import ChatTemplate
from services.gateway.dashboard import DashboardState, dashboard_page, dashboard_view
from services.gateway.observe import TimedStream, outcome_of
from services.gateway.openai_api import (
    ApiError,
    Sampling,
    error_for,
    no_plan,
    parse_chat,
    parse_completion,
    parse_embedding,
    unknown_model,
)
from shared.errors import BusError
from shared.messages import Plan, TokenGenerated
from shared.metrics import EventSeries, ServiceMetrics

Handler = Callable[[Request], Awaitable[Response]]
GATEWAY_SERIES: tuple[EventSeries, ...] = ("latency", "tokens", "requests")
"""The Prometheus series the gateway feeds (shared/metrics.py)."""


@dataclass
class Backend:
    """What the routes use: the shared client, the served plan, the chat template."""

    client: Client
    current_plan: Callable[[], Plan | None]
    chat_template: ChatTemplate
    api_key: str | None = None
    request_timeout_s: float = 120.0
    metrics: ServiceMetrics = field(default_factory=lambda: ServiceMetrics("gateway", GATEWAY_SERIES))
    dashboard: DashboardState = field(default_factory=DashboardState)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def build_app(backend: Backend) -> Starlette:
    """The ASGI app over ``backend``."""
    api = _Api(backend)
    routes = [
        Route("/health", api.health, methods=["GET"]),  # no key: a container's health check
        Route("/v1/models", api.guarded(api.models), methods=["GET"]),
        Route("/v1/completions", api.guarded(api.completions), methods=["POST"]),
        Route("/v1/chat/completions", api.guarded(api.chat), methods=["POST"]),
        Route("/v1/embeddings", api.guarded(api.embeddings), methods=["POST"]),
        Route("/dashboard", api.guarded(api.dashboard), methods=["GET"]),
        Route("/dashboard/state", api.guarded(api.dashboard_state), methods=["GET"]),
        Route("/dashboard/events", api.guarded(api.dashboard_events), methods=["GET"]),
    ]
    return Starlette(routes=routes)


class _Api:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def guarded(self, handler: Handler) -> Handler:
        """The API key check, then ``handler``; any error becomes OpenAI's error shape."""

        async def run(request: Request) -> Response:
            try:
                self._authorise(request)
                return await handler(request)
            except Exception as error:  # noqa: BLE001 - every failure answers in OpenAI's shape
                return error_response(error_for(error))

        return run

    def _authorise(self, request: Request) -> None:
        key = self.backend.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" and request.url.path.startswith("/dashboard"):
            scheme, token = "bearer", request.query_params.get("key", "")  # a browser's EventSource sends no header
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           "invalid_request_error", None, "invalid_api_key")  # fmt: skip

    def _served(self, model: str | None = None) -> Plan:
        plan = self.backend.current_plan()
        if plan is None:
            raise no_plan()
        if model is not None and model != plan.model_id:
            raise unknown_model(model, plan.model_id)
        return plan

    async def health(self, request: Request) -> Response:
        """200 while the broker connection is up (whether a plan is served or not), else
        503. Unauthenticated, so it says nothing but that."""
        try:
            up = self.backend.client.bus.ready.is_set()
        except BusError:  # not connected (yet)
            up = False
        body = {"status": "ok" if up else "unavailable", "broker": up,
                "plan": self.backend.current_plan() is not None}  # fmt: skip
        return JSONResponse(body, status_code=200 if up else 503)

    async def models(self, request: Request) -> Response:
        plan = self._served()
        return JSONResponse({"object": "list", "data": [
            {"id": plan.model_id, "object": "model", "created": 0, "owned_by": "edgesplit"}]})  # fmt: skip

    async def completions(self, request: Request) -> Response:
        call = parse_completion(await _json(request))
        self._served(call.model)
        stream = self._generate(call.prompt, call.sampling)
        return await self._answer(stream, call.model, call.sampling, "text_completion")

    async def chat(self, request: Request) -> Response:
        call = parse_chat(await _json(request))
        self._served(call.model)
        prompt = self.backend.chat_template.render(call.messages)
        stream = self._generate(prompt, call.sampling)
        return await self._answer(stream, call.model, call.sampling, "chat.completion")

    async def dashboard(self, request: Request) -> Response:
        return HTMLResponse(dashboard_page(), headers={"Cache-Control": "no-cache"})

    async def dashboard_state(self, request: Request) -> Response:
        return JSONResponse(dashboard_view(self.backend.dashboard))

    async def dashboard_events(self, request: Request) -> Response:
        return StreamingResponse(self.backend.dashboard.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    async def embeddings(self, request: Request) -> Response:
        call = parse_embedding(await _json(request))
        self._served(call.model)
        data = []
        for index, text in enumerate(call.texts):
            vector = await self._embed(text)
            encoded: Any = list(vector)
            if call.base64:
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return JSONResponse({"object": "list", "data": data, "model": call.model,
                             "usage": {"prompt_tokens": 0, "total_tokens": 0}})  # fmt: skip

    async def _embed(self, text: str) -> tuple[float, ...]:
        requests = self.backend.metrics.requests
        try:
            vector = await self.backend.client.embed(text, timeout_s=self.backend.request_timeout_s)
        except Exception as error:
            requests.labels("embed", outcome_of(error)).inc()
            raise
        requests.labels("embed", "ok").inc()
        return vector

    def _generate(self, prompt: str | tuple[int, ...], sampling: Sampling) -> TimedStream:
        stream = self.backend.client.generate(
            prompt, max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=sampling.seed, timeout_s=self.backend.request_timeout_s)  # fmt: skip
        return TimedStream(stream, self.backend.metrics, self.backend.dashboard.record_tpot)

    async def _answer(self, stream: TimedStream, model: str, sampling: Sampling, kind: str) -> Response:
        shape = _Shape(kind, model)
        if not sampling.stream:
            try:
                final = await stream.collect()
            finally:
                await stream.aclose()
            finish = "stop" if final.finish_reason == "eos" else "length"
            body = shape.whole(final.text, list(final.token_ids), finish)
            return JSONResponse(body)
        try:
            first = await anext(stream, None)  # a refusal is still an HTTP error
        except BaseException:
            await stream.aclose()
            raise
        return StreamingResponse(self._events(stream, first, shape, sampling), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    async def _events(self, stream: TimedStream, first: TokenGenerated | None, shape: _Shape,
                      sampling: Sampling) -> AsyncIterator[str]:  # fmt: skip
        count, sent = 0, []
        try:
            if shape.chat:
                yield _event(shape.chunk({"role": "assistant", "content": ""}, None))
            token = first
            while token is not None:
                count += 1
                sent.append(token.text)
                yield _event(shape.chunk(shape.delta(token.text), None, [token.token_id]))
                token = await anext(stream, None)
            final = stream.result
            finish = "stop" if final is not None and final.finish_reason == "eos" else "length"
            # Text a token held back (an incomplete UTF-8 sequence at the end) comes with the
            # last chunk, so the streamed text adds up to the final text.
            streamed = "".join(sent)
            rest = final.text[len(streamed):] if final is not None and final.text.startswith(streamed) else ""
            yield _event(shape.chunk(shape.delta(rest), finish))
            if sampling.include_usage:
                yield _event({**shape.chunk(None, None), "choices": [],
                              "usage": {"prompt_tokens": 0, "completion_tokens": count, "total_tokens": count}})  # fmt: skip
        except Exception as error:  # noqa: BLE001 - the headers are sent: the error is an event
            yield _event(error_for(error).body())
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"


class _Shape:
    """OpenAI's response objects for completions (``text``) or chat (``message``/``delta``)."""

    def __init__(self, kind: str, model: str) -> None:
        self.chat = kind == "chat.completion"
        self.kind, self.model = kind, model
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())

    def delta(self, text: str) -> dict[str, Any]:
        return {"content": text} if self.chat else {"text": text}

    def chunk(self, delta: dict[str, Any] | None, finish: str | None,
              token_ids: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if delta is not None:
            choice.update({"delta": delta} if self.chat else delta)
        if token_ids is not None:
            choice["token_ids"] = token_ids
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice]}  # fmt: skip

    def whole(self, text: str, token_ids: list[int], finish: str) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None, "token_ids": token_ids}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {"id": self.id, "object": self.kind if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": [choice],
                "usage": {"prompt_tokens": 0, "completion_tokens": len(token_ids),
                          "total_tokens": len(token_ids)}}  # fmt: skip


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON", "invalid_request_error") from None
