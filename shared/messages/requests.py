"""Requests to an entry node and its replies to clients."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Literal

import msgpack
from pydantic import Field, model_validator

from shared.ids import RequestIdField, TopicId
from shared.messages.base import (
    MAX_ITEMS,
    LongText,
    Message,
    NonNegativeFloat,
    NonNegativeInt,
    ShortText,
    TokenId,
)

ReplyKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A request's reply key: 256 random bits, hex. The client chooses it; only the entry
the request goes to reads it (``nodes/{entry}/requests``), and MACs its replies with it."""
ReplyMac = Annotated[str, Field(max_length=64)]

# --- requests -------------------------------------------------------------------------------


class GenerateRequest(Message):
    """Command to the entry node: generate up to ``max_new_tokens`` after a prompt.

    Exactly one of ``prompt`` and ``token_ids`` is given. Replies go to the
    client-replies topic of ``reply_to`` (a client id, never a raw topic string).
    """

    request_id: RequestIdField
    reply_to: TopicId
    prompt: LongText | None = None
    token_ids: Annotated[tuple[TokenId, ...], Field(max_length=MAX_ITEMS)] | None = None
    max_new_tokens: Annotated[int, Field(ge=1, le=65536)] = 64
    temperature: NonNegativeFloat = 0.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: NonNegativeInt | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """Deadline for the whole request, counted from its arrival at the entry node."""
    resume_token_ids: Annotated[tuple[TokenId, ...], Field(max_length=MAX_ITEMS)] | None = None
    """A resubmission (the client lost its entry or some replies): the tokens the client
    already has. The entry continues after them (or resends what it has beyond them)."""
    reply_key: ReplyKey | None = None
    """When set, every reply carries ``mac`` under this key (`seal_reply`)."""

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        return self


class EmbedRequest(Message):
    """Command to the entry node of an encoder plan: embed a text (one pass)."""

    request_id: RequestIdField
    reply_to: TopicId
    text: LongText
    normalize: bool = True
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    reply_key: ReplyKey | None = None
    """When set, every reply carries ``mac`` under this key (`seal_reply`)."""


class TokenGenerated(Message):
    """Event streamed to the client: token number ``index`` (0-based) of a request."""

    request_id: RequestIdField
    index: NonNegativeInt
    token_id: TokenId
    text: ShortText
    """The text this token adds (may be empty for a partial UTF-8 sequence)."""
    mac: ReplyMac = ""
    """HMAC-SHA256 under the request's ``reply_key`` (hex; empty when it had none)."""


class RequestFinished(Message):
    """Event: a generation finished; all its tokens and its timings. The client's own
    reply carries the tokens and text; the copy on ``requests/finished`` (for the
    orchestrator's calibration) carries only numbers: see `without_content`."""

    request_id: RequestIdField
    token_ids: tuple[TokenId, ...] = Field(max_length=MAX_ITEMS)
    text: LongText = ""
    finish_reason: Literal["eos", "length"] = "length"
    ttft_s: NonNegativeFloat
    """Time to first token, from the request's arrival at the entry node."""
    tpot_s: NonNegativeFloat
    """Mean time per output token after the first."""
    token_count: NonNegativeInt | None = None
    """Tokens generated, set when ``token_ids`` and ``text`` were withheld (None: count
    ``token_ids``; older senders never set it)."""
    mac: ReplyMac = ""
    """HMAC-SHA256 under the request's ``reply_key`` (hex; empty when it had none)."""

    @property
    def generated_tokens(self) -> int:
        """How many tokens the generation produced (with or without its content)."""
        return self.token_count if self.token_count is not None else len(self.token_ids)

    def without_content(self) -> RequestFinished:
        """This event with no token ids and no text, only counts and timings: what may go
        to identities other than the client that sent the prompt."""
        return self.model_copy(update={"token_ids": (), "text": "", "token_count": self.generated_tokens,
                                       "mac": ""})


class EmbeddingReady(Message):
    """Event: the embedding of an EmbedRequest."""

    request_id: RequestIdField
    embedding: tuple[float, ...] = Field(max_length=MAX_ITEMS)
    elapsed_s: NonNegativeFloat
    mac: ReplyMac = ""
    """HMAC-SHA256 under the request's ``reply_key`` (hex; empty when it had none)."""


class RequestFailed(Message):
    """Event: a request could not be served; ``error`` is machine-readable."""

    request_id: RequestIdField
    error: Literal["busy", "context_too_long", "timeout", "invalid_request", "internal", "no_plan",
                   "overloaded"]
    message: ShortText
    mac: ReplyMac = ""
    """HMAC-SHA256 under the request's ``reply_key`` (hex; empty when it had none)."""


Reply = TokenGenerated | RequestFinished | EmbeddingReady | RequestFailed


def reply_mac(reply: Reply, key: str) -> str:
    """Hex HMAC-SHA256 under ``key`` (a ReplyKey) of the reply's kind and every field but
    its ``mac``."""
    body = msgpack.packb([reply.kind, reply.model_dump(exclude={"mac"})], use_bin_type=True)
    return hmac.new(bytes.fromhex(key), body, hashlib.sha256).hexdigest()


def seal_reply(reply: Reply, key: str) -> Reply:
    """``reply`` with its ``mac`` set for the request's ``key`` (what the entry sends)."""
    return reply.model_copy(update={"mac": reply_mac(reply, key)})


def reply_sealed(reply: Reply, key: str) -> bool:
    """True when ``reply`` carries a valid MAC under ``key`` (constant-time comparison)."""
    return bool(reply.mac) and hmac.compare_digest(reply_mac(reply, key), reply.mac)
