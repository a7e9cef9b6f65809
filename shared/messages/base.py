"""The base of every control-plane message, the wire bounds and `Segment`."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any, ClassVar, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.ids import NodeIdField

# Bounds keep every value encodable (msgpack ints are 64-bit) and under the codec's limits.
INT_LIMIT = 2**63
Epoch = Annotated[int, Field(ge=0, lt=INT_LIMIT)]
NonNegativeInt = Annotated[int, Field(ge=0, lt=INT_LIMIT)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
ShortText = Annotated[str, Field(max_length=1024)]
LongText = Annotated[str, Field(max_length=65_536)]  # <= 256 KiB of UTF-8 (codec limit)
MAX_ITEMS = 65_536  # the codec's max_array_len
Signature = Annotated[str, Field(max_length=128)]
"""Hex HMAC-SHA256 (64 chars) or ``ed25519:`` + base64 of an Ed25519 signature (96 chars)."""
"""Hex HMAC-SHA256 of a control message's canonical encoding ("" = unsigned)."""

MESSAGE_KINDS: dict[str, type[Message]] = {}
"""Wire kind (class name) -> message class; filled as the classes are defined."""


class Message(BaseModel):
    """Base of every control-plane payload. Subclasses register under their class name."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)
    kind: ClassVar[str] = "Message"

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__name__ in MESSAGE_KINDS:
            raise TypeError(f"message kind {cls.__name__} is declared twice")
        cls.kind = cls.__name__
        MESSAGE_KINDS[cls.__name__] = cls


class Part(BaseModel):
    """A nested value inside a message (not a message of its own)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)


class Segment(Part):
    """Layers [start, end) of the model, run on ``node``."""

    node: NodeIdField
    start: NonNegativeInt
    end: NonNegativeInt

    @model_validator(mode="after")
    def _non_empty(self) -> Segment:
        if self.end <= self.start:
            raise ValueError(f"segment [{self.start}, {self.end}) on {self.node} is empty")
        return self


# --- signed control messages ----------------------------------------------------------------

SignedT = TypeVar("SignedT", bound=Message)


def is_signed_kind(message: Message) -> bool:
    """True for a message kind that carries a ``signature`` (a control message)."""
    return "signature" in type(message).model_fields


def signing_bytes(message: Message) -> bytes:
    """Canonical bytes a signature covers: the kind and every field but the signature."""
    body = message.model_dump(exclude={"signature"})
    packed: bytes = msgpack.packb([message.kind, body], use_bin_type=True)
    return packed


def signature_of(message: Message, key: str) -> str:
    """Hex HMAC-SHA256 of ``message`` under ``key``."""
    return hmac.new(key.encode(), signing_bytes(message), hashlib.sha256).hexdigest()


def sign(message: SignedT, key: str) -> SignedT:
    """``message`` with its signature set for ``key`` (TypeError for an unsigned kind)."""
    if not is_signed_kind(message):
        raise TypeError(f"{message.kind} carries no signature")
    return message.model_copy(update={"signature": signature_of(message, key)})


def signature_ok(message: Message, key: str) -> bool:
    """True when ``message`` is signed with ``key`` (constant-time comparison)."""
    given = getattr(message, "signature", "")
    return bool(given) and hmac.compare_digest(signature_of(message, key), given)
