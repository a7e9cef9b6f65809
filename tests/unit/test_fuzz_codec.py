"""Fuzzing the message codec (shared/codec.py ``decode``): arbitrary bytes, valid
encodings of every message kind mutated byte by byte, and valid envelopes with their
decoded tree edited (wrong types, missing or surplus keys, edge numbers) and re-packed.

Property: ``decode`` returns or raises DecodeError (UnknownMessageKind is one), never
anything else; what it accepts is a well-formed envelope whose message round-trips.
Settings: tests/unit/fuzz_profiles.py (10,000 examples per test with ``CI`` set)."""

from __future__ import annotations

import math

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from shared import codec
from shared.errors import DecodeError
from shared.ids import validate_id
from shared.messages import MESSAGE_KINDS
from tests.unit.fuzz_profiles import FUZZ
from tests.unit.fuzz_support import mutate_bytes, mutate_tree, trees
from tests.unit.test_messages import EXAMPLES


def _decode_checked(payload: bytes) -> None:
    try:
        envelope = codec.decode(payload)
    except DecodeError:
        return
    # Accepted: every envelope field is valid and the message round-trips unchanged.
    assert type(envelope.message) is MESSAGE_KINDS[envelope.kind]
    assert validate_id(envelope.origin) == envelope.origin
    assert type(envelope.seq) is int and envelope.seq >= 0
    assert math.isfinite(envelope.sent_at_s)
    again = codec.decode(
        codec.encode(envelope.message, origin=envelope.origin, seq=envelope.seq,
                     sent_at_s=envelope.sent_at_s)
    )  # fmt: skip
    assert again == envelope


CORPUS = tuple(
    codec.encode(message, origin="w1", seq=index, sent_at_s=1.7e9)
    for index, message in enumerate(EXAMPLES)
)
"""A valid encoding of every message kind (tests/unit/test_messages.py's hand-built
examples, one or more per kind)."""


def _valid(data: st.DataObject) -> bytes:
    return data.draw(st.sampled_from(CORPUS), label="valid")


@FUZZ
@given(st.data())
def test_fuzz_codec_decode(data: st.DataObject) -> None:
    """One of: random bytes, a valid encoding with byte edits, a valid envelope with
    tree edits; decode raises only DecodeError and accepts only valid envelopes."""
    source = data.draw(st.sampled_from(["random", "bytes", "tree"]), label="source")
    if source == "random":
        payload = data.draw(st.binary(max_size=512), label="payload")
    elif source == "bytes":
        payload = mutate_bytes(data, _valid(data))
    else:
        tree = msgpack.unpackb(_valid(data), raw=False)
        edited = mutate_tree(data, tree, trees())
        try:
            payload = msgpack.packb(edited, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):  # e.g. an int over 64 bits
            payload = msgpack.packb(tree, use_bin_type=True)
    _decode_checked(payload)
