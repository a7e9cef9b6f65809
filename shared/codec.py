"""msgpack encoding of control messages in a versioned envelope, with explicit limits.

Wire form: a msgpack map ``{"v": 1, "kind": "NodeStatus", "origin": "w1", "seq": 7,
"sent_at_s": 1.7e9, "body": {...}}``. Decoding never raises anything but DecodeError
(UnknownMessageKind for an unknown kind): every length is bounded before allocation
(msgpack checks the limits against length prefixes) and nesting depth is checked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgpack
from pydantic import ValidationError

from shared.errors import DecodeError, UnknownMessageKind, WireError
from shared.ids import validate_id
from shared.messages import MESSAGE_KINDS, Message

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20  # a Plan or a long prompt is tens of KB; 1 MiB is generous
MAX_STR_BYTES = 256 * 1024
MAX_BIN_BYTES = 256 * 1024
MAX_ARRAY_LEN = 65_536  # e.g. token ids of a long request
MAX_MAP_LEN = 1_024
MAX_NESTING_DEPTH = 16
_ENVELOPE_KEYS = frozenset({"v", "kind", "origin", "seq", "sent_at_s", "body"})

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Envelope(Generic[M]):
    """A decoded message with who sent it, its per-origin sequence number and send time."""

    message: M
    origin: str
    seq: int
    sent_at_s: float
    version: int = SCHEMA_VERSION

    @property
    def kind(self) -> str:
        return self.message.kind


def unpack_limited(
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_array_len: int = MAX_ARRAY_LEN,
    max_depth: int = MAX_NESTING_DEPTH,
) -> Any:
    """msgpack-decode untrusted bytes with every limit set; raise DecodeError on anything.

    Arrays decode as tuples, maps need str keys, ext types are refused.
    """
    if len(payload) > max_bytes:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        value = msgpack.unpackb(
            payload,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=min(MAX_STR_BYTES, max_bytes),
            max_bin_len=min(MAX_BIN_BYTES, max_bytes),
            max_array_len=max_array_len,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except DecodeError:
        raise
    except Exception as error:  # msgpack raises ValueError, OutOfData, StackError, TypeError...
        raise DecodeError(f"malformed msgpack ({type(error).__name__}: {error})") from None
    _check_depth(value, max_depth)
    return value


def _refuse_ext(code: int, data: bytes) -> Any:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


def _check_depth(value: Any, max_depth: int) -> None:
    """Raise DecodeError when containers nest deeper than ``max_depth`` (iterative)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, tuple):
            children: Collection[Any] = item
        elif isinstance(item, dict):
            children = item.values()
        else:
            continue
        if depth > max_depth:
            raise DecodeError(f"containers nest deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, tuple | dict))


def encode(message: Message, *, origin: str, seq: int, sent_at_s: float | None = None) -> bytes:
    """Envelope and msgpack-encode ``message``; ``sent_at_s``: Unix s (default: now).

    Raises WireError if it exceeds the size limit or ``sent_at_s`` is not finite.
    """
    if sent_at_s is not None and not math.isfinite(sent_at_s):
        raise WireError(
            f"{message.kind}: sent_at_s must be a finite Unix time (s), got {sent_at_s!r}"
        )
    envelope = {
        "v": SCHEMA_VERSION,
        "kind": message.kind,
        "origin": origin,
        "seq": seq,
        "sent_at_s": time.time() if sent_at_s is None else sent_at_s,
        "body": message.model_dump(),
    }
    try:
        payload: bytes = msgpack.packb(envelope, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as error:
        raise WireError(f"{message.kind} cannot be encoded: {error}") from None
    if len(payload) > MAX_MESSAGE_BYTES:
        raise WireError(
            f"{message.kind} encodes to {len(payload)} bytes, over the {MAX_MESSAGE_BYTES}-byte "
            "limit: send tensors as frames, not messages"
        )
    return payload


def decode(
    payload: bytes | bytearray | memoryview,
    allowed: Collection[type[Message]] | None = None,
) -> Envelope[Message]:
    """Decode an envelope. ``allowed`` restricts the kinds (a topic's payload types).

    Raises UnknownMessageKind for a kind this version does not know, DecodeError for
    anything else that is wrong (size, msgpack, schema version, field validation).
    """
    raw = unpack_limited(payload)
    if not isinstance(raw, dict) or set(raw) != _ENVELOPE_KEYS:
        keys = sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise DecodeError(f"not an envelope (got {keys})")
    version, kind, origin, seq, sent_at_s, body = (
        raw["v"], raw["kind"], raw["origin"], raw["seq"], raw["sent_at_s"], raw["body"],
    )  # fmt: skip
    if version != SCHEMA_VERSION or type(version) is not int:
        raise DecodeError(f"schema version {version!r} is not supported (this build speaks 1)")
    if not isinstance(kind, str):
        raise DecodeError(f"message kind must be a string, got {type(kind).__name__}")
    cls = MESSAGE_KINDS.get(kind)
    if cls is None:
        raise UnknownMessageKind(f"unknown message kind {kind[:64]!r}")
    if allowed is not None and cls not in allowed:
        raise DecodeError(f"message kind {kind} is not allowed on this topic")
    _check_meta(origin, seq, sent_at_s)
    try:
        message = cls.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise DecodeError(
            f"invalid {kind} ({error.error_count()} errors; first at {where or 'body'}: "
            f"{first['msg']})"
        ) from None
    return Envelope(message=message, origin=origin, seq=seq, sent_at_s=float(sent_at_s))


def _check_meta(origin: Any, seq: Any, sent_at_s: Any) -> None:
    try:
        validate_id(origin, "origin")
    except Exception as error:  # InvalidId for bad text, anything for a wrong type
        raise DecodeError(str(error)) from None
    if type(seq) is not int or seq < 0:
        raise DecodeError(f"seq must be a non-negative integer, got {seq!r}")
    if type(sent_at_s) not in (int, float):
        raise DecodeError(f"sent_at_s must be a number, got {type(sent_at_s).__name__}")
    if not math.isfinite(sent_at_s):
        raise DecodeError(f"sent_at_s must be a finite Unix time (s), got {sent_at_s!r}")
