"""Requests to an entry node and its replies to clients."""

from __future__ import annotations

from typing import Annotated, Literal

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


class TokenGenerated(Message):
    """Event streamed to the client: token number ``index`` (0-based) of a request."""

    request_id: RequestIdField
    index: NonNegativeInt
    token_id: TokenId
    text: ShortText
    """The text this token adds (may be empty for a partial UTF-8 sequence)."""


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

    @property
    def generated_tokens(self) -> int:
        """How many tokens the generation produced (with or without its content)."""
        return self.token_count if self.token_count is not None else len(self.token_ids)

    def without_content(self) -> RequestFinished:
        """This event with no token ids and no text, only counts and timings: what may go
        to identities other than the client that sent the prompt."""
        return self.model_copy(update={"token_ids": (), "text": "", "token_count": self.generated_tokens})


class EmbeddingReady(Message):
    """Event: the embedding of an EmbedRequest."""

    request_id: RequestIdField
    embedding: tuple[float, ...] = Field(max_length=MAX_ITEMS)
    elapsed_s: NonNegativeFloat


class RequestFailed(Message):
    """Event: a request could not be served; ``error`` is machine-readable."""

    request_id: RequestIdField
    error: Literal["busy", "context_too_long", "timeout", "invalid_request", "internal", "no_plan",
                   "overloaded"]
    message: ShortText
