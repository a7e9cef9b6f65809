"""OpenAI's request and error shapes, as pure functions: parse a JSON body into a typed
request, turn the client library's typed errors into OpenAI's error body and status.

Nothing here does I/O. A body the gateway cannot serve raises `ApiError` (status 400
with the offending ``param``); `error_for(exception)` maps the client library's errors:

| client library error | status | OpenAI ``type`` |
|---|---|---|
| ConfigError, ContextTooLong, ``invalid_request`` refusals | 400 | invalid_request_error |
| Busy, Overloaded | 429 | rate_limit_exceeded |
| NoFeasiblePlan, no plan, BrokerUnavailable | 503 | service_unavailable |
| StageTimedOut, NoAnswer (past the deadline) | 504 | timeout |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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

DEFAULT_COMPLETION_TOKENS = 16
"""OpenAI's default ``max_tokens`` for /v1/completions."""
DEFAULT_CHAT_TOKENS = 256
"""``max_tokens`` of a chat completion that names none."""
MAX_TOKENS_LIMIT = 65536


@dataclass(frozen=True)
class ApiError(Exception):
    """An answer in OpenAI's error shape: ``status`` and ``body()``."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"


@dataclass(frozen=True)
class Sampling:
    """What a completion asks of the generation."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class CompletionCall:
    """/v1/completions: one prompt, text or token ids."""

    model: str
    prompt: str | tuple[int, ...]
    sampling: Sampling


@dataclass(frozen=True)
class ChatCall:
    """/v1/chat/completions: the messages as (role, content) pairs."""

    model: str
    messages: tuple[tuple[str, str], ...]
    sampling: Sampling


@dataclass(frozen=True)
class EmbeddingCall:
    """/v1/embeddings: one or more texts."""

    model: str
    texts: tuple[str, ...]
    base64: bool


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required (a string: see /v1/models)", "model")
    return model


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:  # fmt: skip
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad(f"'{name}' must be a number", name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"'{name}' must be in {interval}, got {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def _unsupported(body: dict[str, Any], names: tuple[str, ...]) -> None:
    """Options whose effect the gateway cannot give: refused, never silently ignored."""
    for name in names:
        if body.get(name) not in (None, False, 0, [], ""):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise bad("only 'n' = 1 is supported", "n", "unsupported_parameter")


def _sampling(body: dict[str, Any], default_tokens: int, token_names: tuple[str, ...]) -> Sampling:
    max_tokens: int | None = None
    for name in token_names:  # max_completion_tokens (newer) or max_tokens
        max_tokens = max_tokens or _integer(body, name, None, 1, MAX_TOKENS_LIMIT)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    return Sampling(
        max_tokens=max_tokens or default_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed, stream=stream, include_usage=bool(options.get("include_usage")),
    )  # fmt: skip


def _token_ids(values: list[Any], param: str) -> tuple[int, ...]:
    if not values:
        raise bad(f"'{param}' must not be empty", param)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise bad(f"'{param}' must be a string or a list of non-negative token ids", param)
    return tuple(values)


def parse_completion(body: Any) -> CompletionCall:
    """A /v1/completions body. Raises ApiError (400) naming the bad parameter."""
    body = _require_object(body)
    model = _model(body)
    _unsupported(body, ("stop", "logprobs", "echo", "suffix", "best_of", "logit_bias"))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    parsed: str | tuple[int, ...]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' must not be empty", "prompt")
        parsed = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise bad("one prompt per request is supported, got a batch", "prompt", "unsupported_parameter")
    elif isinstance(prompt, list):
        parsed = _token_ids(prompt, "prompt")
    else:
        raise bad("'prompt' is required: a string or a list of token ids", "prompt")
    return CompletionCall(model, parsed, _sampling(body, DEFAULT_COMPLETION_TOKENS, ("max_tokens",)))


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad("only text content parts are supported", f"messages[{index}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad("each message needs a 'content' string", f"messages[{index}].content")


def parse_chat(body: Any) -> ChatCall:
    """A /v1/chat/completions body. Raises ApiError (400) naming the bad parameter."""
    body = _require_object(body)
    model = _model(body)
    _unsupported(body, ("stop", "logprobs", "top_logprobs", "tools", "functions", "logit_bias"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    pairs = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad("each message must be an object", f"messages[{index}]")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"unsupported role {role!r}", f"messages[{index}].role")
        pairs.append(("system" if role == "developer" else role, _content(message, index)))
    sampling = _sampling(body, DEFAULT_CHAT_TOKENS, ("max_completion_tokens", "max_tokens"))
    return ChatCall(model, tuple(pairs), sampling)


def parse_embedding(body: Any) -> EmbeddingCall:
    """A /v1/embeddings body. Raises ApiError (400) naming the bad parameter."""
    body = _require_object(body)
    model = _model(body)
    text = body.get("input")
    texts = (text,) if isinstance(text, str) else tuple(text) if isinstance(text, list) else ()
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise bad("'input' must be a non-empty string or a list of them (token ids are not "
                  "supported for embeddings)", "input")  # fmt: skip
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad("'dimensions' is not supported by this server", "dimensions", "unsupported_parameter")
    return EmbeddingCall(model, texts, fmt == "base64")


def error_for(error: BaseException) -> ApiError:
    """OpenAI's error for a client-library error (see the module's table)."""
    text = str(error)
    if isinstance(error, ApiError):
        return error
    if isinstance(error, ContextTooLong):
        return ApiError(400, text, "invalid_request_error", "prompt", "context_length_exceeded")
    if isinstance(error, ConfigError):
        return ApiError(400, text, "invalid_request_error")
    if isinstance(error, Busy | Overloaded):
        return ApiError(429, text, "rate_limit_exceeded", None, "overloaded")
    if isinstance(error, StageTimedOut | NoAnswer):
        return ApiError(504, text, "timeout", None, "deadline_exceeded")
    if isinstance(error, ServingError) and text.startswith("invalid_request"):
        return ApiError(400, text, "invalid_request_error")
    if isinstance(error, ServingError) and text.startswith("no_plan") or isinstance(error, BusError):
        return ApiError(503, text, "service_unavailable", None, "no_plan")
    if isinstance(error, EdgesplitError):
        return ApiError(500, text, "server_error")
    return ApiError(500, "internal error in the gateway", "server_error")


def no_plan() -> ApiError:
    return ApiError(503, "no plan is being served: the system has no model running "
                         "(is `edgesplit up` running?)", "service_unavailable", None, "no_plan")  # fmt: skip


def unknown_model(model: str, served: str) -> ApiError:
    return ApiError(400, f"model {model!r} does not exist; this server serves {served!r}",
                    "invalid_request_error", "model", "model_not_found")  # fmt: skip
