"""Activation frames: a small msgpack header followed by the raw tensor bytes.

Layout (all little-endian)::

    b"ESF1" | u32 header length | msgpack header | zero padding to 16 bytes | tensor bytes

The header carries dtype, shape, request id, step, epoch, seq and a small ``extra``
map (e.g. positions). Decoding reads the tensor zero-copy with ``np.frombuffer``; the
array is read-only when the payload is ``bytes`` (as received from MQTT).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.codec import unpack_limited
from shared.errors import DecodeError, TensorFrameError
from shared.ids import RequestIdField

MAGIC = b"ESF1"
_PREFIX = struct.Struct("<4sI")
ALIGN_BYTES = 16
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAME_BYTES = 64 * 1024 * 1024  # the broker's max_packet_size (deploy/mosquitto)
MAX_DIMS = 8
ALLOWED_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "float32",
        "float16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    )
}

_Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]
ExtraValue = (
    bool
    | _Int64
    | float
    | Annotated[str, Field(max_length=256)]
    | tuple[_Int64, ...]
    | tuple[float, ...]
)


class FrameHeader(BaseModel):
    """Who a frame belongs to; dtype and shape travel in the wire header too."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)

    request_id: RequestIdField
    step: Annotated[int, Field(ge=0, lt=2**63)]
    """Decode step (0 = prefill)."""
    epoch: Annotated[int, Field(ge=0, lt=2**63)]
    seq: Annotated[int, Field(ge=0, lt=2**63)]
    extra: dict[Annotated[str, Field(max_length=64)], ExtraValue] = Field(
        default_factory=dict, max_length=32
    )


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: header plus a (read-only, zero-copy) array."""

    header: FrameHeader
    array: np.ndarray


def _as_numpy(tensor: Any) -> np.ndarray:
    """A C-contiguous little-endian numpy view of a numpy array or CPU torch tensor."""
    if not isinstance(tensor, np.ndarray):
        if hasattr(tensor, "detach") and hasattr(tensor, "numpy"):  # torch, without importing it
            if str(tensor.dtype) == "torch.bfloat16":
                raise TensorFrameError("bfloat16 has no numpy dtype: send float16 or float32")
            tensor = tensor.detach().cpu().contiguous().numpy()
        else:
            raise TensorFrameError(f"cannot send a {type(tensor).__name__} as a tensor frame")
    if tensor.dtype.name not in ALLOWED_DTYPES:
        raise TensorFrameError(f"dtype {tensor.dtype} is not allowed in frames")
    return np.asarray(tensor, dtype=ALLOWED_DTYPES[tensor.dtype.name], order="C")


def encode_frame(header: FrameHeader, tensor: Any) -> bytes:
    """Header + raw tensor bytes; copies the tensor once (zero extra for contiguous input).

    Raises TensorFrameError for a dtype outside ALLOWED_DTYPES or a frame over
    MAX_FRAME_BYTES.
    """
    array = _as_numpy(tensor)
    wire_header = header.model_dump()
    wire_header["dtype"] = array.dtype.name
    wire_header["shape"] = array.shape
    packed = msgpack.packb(wire_header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise TensorFrameError(f"frame header of {len(packed)} bytes is over {MAX_HEADER_BYTES}")
    start = _PREFIX.size + len(packed)
    padding = b"\0" * (-start % ALIGN_BYTES)
    if start + len(padding) + array.nbytes > MAX_FRAME_BYTES:
        raise TensorFrameError(f"frame of {array.nbytes} tensor bytes is over {MAX_FRAME_BYTES}")
    body = array.data.cast("B") if array.size else b""
    return b"".join((_PREFIX.pack(MAGIC, len(packed)), packed, padding, body))


def decode_frame(payload: bytes | bytearray | memoryview) -> tuple[FrameHeader, np.ndarray]:
    """Parse a frame; the array views ``payload`` (zero-copy, read-only for bytes).

    Raises TensorFrameError (a DecodeError) for a bad prefix, header, dtype, shape or
    byte count; it never allocates more than the payload's size.
    """
    view = memoryview(payload).cast("B")
    if len(view) > MAX_FRAME_BYTES:
        raise TensorFrameError(f"frame of {len(view)} bytes is over {MAX_FRAME_BYTES}")
    if len(view) < _PREFIX.size:
        raise TensorFrameError(f"frame of {len(view)} bytes is shorter than its prefix")
    magic, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise TensorFrameError(f"not a tensor frame (magic {bytes(magic)!r})")
    if header_len > min(MAX_HEADER_BYTES, len(view) - _PREFIX.size):
        raise TensorFrameError(f"header length {header_len} does not fit the frame")
    try:
        raw = unpack_limited(view[_PREFIX.size : _PREFIX.size + header_len], max_array_len=4096)
    except DecodeError as error:
        raise TensorFrameError(f"bad frame header: {error}") from None
    if not isinstance(raw, dict):
        raise TensorFrameError("frame header is not a map")
    dtype, shape = _checked_layout(raw.pop("dtype", None), raw.pop("shape", None))
    try:
        header = FrameHeader.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        raise TensorFrameError(f"bad frame header at {first['loc']}: {first['msg']}") from None
    start = _PREFIX.size + header_len
    start += -start % ALIGN_BYTES
    count = math.prod(shape)
    if start + count * dtype.itemsize != len(view):
        raise TensorFrameError(
            f"frame holds {len(view) - start} tensor bytes; {dtype.name}{list(shape)} "
            f"needs {count * dtype.itemsize}"
        )
    array = np.frombuffer(view, dtype=dtype, count=count, offset=start).reshape(shape)
    return header, array


def _checked_layout(dtype: Any, shape: Any) -> tuple[np.dtype[Any], tuple[int, ...]]:
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise TensorFrameError(f"dtype {str(dtype)[:32]!r} is not allowed in frames")
    if not isinstance(shape, tuple) or len(shape) > MAX_DIMS:
        raise TensorFrameError(f"shape must be a list of at most {MAX_DIMS} dimensions")
    for dim in shape:
        if type(dim) is not int or dim < 0 or dim > MAX_FRAME_BYTES:
            raise TensorFrameError(f"bad dimension {dim!r} in shape")
    return ALLOWED_DTYPES[dtype], shape


def to_torch(array: np.ndarray) -> Any:
    """A torch tensor sharing ``array``'s memory, without torch's read-only-array warning.

    The tensor must be treated as read-only when the frame came from the network.
    """
    import warnings

    import torch  # imported here: only compute processes need it

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
