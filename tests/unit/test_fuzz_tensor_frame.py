"""Fuzzing the tensor frame decoder (shared/tensor_frame.py ``decode_frame`` with the
typed headers of shared/frame_headers.py): arbitrary bytes (with and without the
magic), valid frames of every header kind mutated byte by byte, and valid frames whose
msgpack header map is edited (wrong types, missing or surplus fields, other dtypes and
shapes, edge numbers) and re-framed around the same tensor bytes.

Property: ``decode_frame`` returns or raises TensorFrameError, never anything else, and
what it accepts is consistent: a header of the kind it names, an array whose dtype,
shape and byte count match the frame, read-only, that re-encodes to the same frame
contents. Settings: tests/unit/fuzz_profiles.py (10,000 examples with ``CI`` set)."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import TensorFrameError
from shared.frame_headers import (
    FRAME_KINDS,
    ActivationHeader,
    BatchHeader,
    BatchRow,
    HandoffHeader,
    KvAckHeader,
    KvHeader,
    ProbeHeader,
    ReleaseHeader,
    ResultHeader,
)
from shared.tensor_frame import ALIGN_BYTES, ALLOWED_DTYPES, MAGIC, decode_frame, encode_frame
from tests.unit.fuzz_profiles import FUZZ
from tests.unit.fuzz_support import mutate_bytes, mutate_tree, trees

_COMMON: dict[str, Any] = {"request_id": "r1", "step": 3, "epoch": 2, "seq": 7}
HEADERS = (
    ActivationHeader(**_COMMON, target=1, pos=4, last_only=False, pass_id=1, src="w1", sent_at=1.7e9),
    ResultHeader(**_COMMON, pass_id=1, kv_missing=False),
    ReleaseHeader(**_COMMON, target=2),
    HandoffHeader(**_COMMON, target=0, pos=5, new_epoch=3, pass_id=2, ack_base=100),
    KvHeader(**_COMMON, target=2, blocks=(2, 3), pos=5, ack_step=101, old_epoch=1, pass_id=2),
    KvAckHeader(**_COMMON, pass_id=2, failed=True),
    ProbeHeader(**_COMMON, role="ping", src="w2"),
    BatchHeader(**_COMMON, of="activation", target=2, src="w1", sent_at=1.7e9,
                rows=(BatchRow(request_id="r1", step=3, pass_id=1, pos=4, last_only=True),
                      BatchRow(request_id="r2", step=9, pass_id=5, pos=11))),
)  # fmt: skip
assert {header.kind for header in HEADERS} == set(FRAME_KINDS)
ARRAYS = (
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.zeros((0, 8), np.float32),
    np.arange(2 * 2 * 1 * 3 * 2, dtype=np.float16).reshape(2, 2, 1, 3, 2),
    np.zeros(5, np.uint8),
    np.array(True),
)
CORPUS = tuple(encode_frame(header, array) for header in HEADERS for array in ARRAYS)
_PREFIX = struct.Struct("<4sI")


def _split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """A valid frame's wire header map and its tensor bytes."""
    _, length = _PREFIX.unpack_from(frame)
    start = _PREFIX.size + length
    start += -start % ALIGN_BYTES
    return msgpack.unpackb(frame[_PREFIX.size : _PREFIX.size + length], raw=False), frame[start:]


def _frame(header: Any, body: bytes) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    start = _PREFIX.size + len(packed)
    return _PREFIX.pack(MAGIC, len(packed)) + packed + b"\0" * (-start % ALIGN_BYTES) + body


def _decode_checked(payload: bytes) -> None:
    try:
        header, array = decode_frame(payload)
    except TensorFrameError:
        return
    assert type(header) is FRAME_KINDS[header.kind]
    _, length = _PREFIX.unpack_from(payload)
    start = _PREFIX.size + length
    start += -start % ALIGN_BYTES
    assert array.nbytes == len(payload) - start == math.prod(array.shape) * array.dtype.itemsize
    assert array.dtype in ALLOWED_DTYPES.values()
    assert not array.flags.writeable  # a view of the received bytes, never written
    sent_at = getattr(header, "sent_at", None)
    assert sent_at is None or math.isfinite(sent_at)
    again_header, again = decode_frame(encode_frame(header, array))
    assert again_header == header
    assert again.dtype == array.dtype and again.shape == array.shape
    assert again.tobytes() == array.tobytes()


@FUZZ
@given(st.data())
def test_fuzz_decode_frame(data: st.DataObject) -> None:
    """One of: random bytes (half of them after the magic), a valid frame with byte
    edits, a valid frame with header-map edits; decode_frame raises only
    TensorFrameError and accepts only consistent frames."""
    source = data.draw(st.sampled_from(["random", "magic", "bytes", "tree"]), label="source")
    valid = data.draw(st.sampled_from(CORPUS), label="valid")
    if source == "random":
        payload = data.draw(st.binary(max_size=512), label="payload")
    elif source == "magic":
        payload = MAGIC + data.draw(st.binary(max_size=512), label="payload")
    elif source == "bytes":
        payload = mutate_bytes(data, valid)
    else:
        wire, body = _split(valid)
        edited = mutate_tree(data, wire, trees())
        try:
            payload = _frame(edited, body)
        except (OverflowError, ValueError, TypeError):  # e.g. an int over 64 bits
            payload = _frame(wire, body)
    _decode_checked(payload)
