"""Tensor frames: a small msgpack header followed by the raw tensor bytes.

Layout (all little-endian)::

    b"ESF3" | u32 header length | msgpack header | zero padding to 16 bytes | tensor bytes

The magic names the frame version (3: every kind but the probe carries ``mac`` and
``src``, docs/SECURITY.md "Frames"). The msgpack header is a map: ``dtype`` and
``shape`` of the tensor plus the fields of one typed header kind, tagged by ``kind``
(`shared/frame_headers.py`: activation, result, release, handoff, kv, kv_ack, probe,
batch: several requests' decode steps, one row each).
A frame of version 1 (b"ESF1", whose header was an untyped ``extra`` map) or 2
(b"ESF2", no MAC) is refused with an error that names the version. Decoding reads the tensor zero-copy with
``np.frombuffer``; the array is read-only when the payload is ``bytes`` (as received
from MQTT).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import numpy as np
from pydantic import ValidationError

from shared.codec import unpack_limited
from shared.errors import DecodeError, TensorFrameError
from shared.frame_headers import FRAME_KINDS, FrameHeader

MAGIC = b"ESF3"
FRAME_VERSION = 3
OLD_MAGICS = {b"ESF1": 1, b"ESF2": 2}
"""Magics of earlier frame versions, so a peer that speaks one gets a clear error."""
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
_DTYPE_NAMES: dict[np.dtype[Any], str] = {dtype: name for name, dtype in ALLOWED_DTYPES.items()}
"""Name of each allowed little-endian dtype; a dict lookup, as ``dtype.name`` costs
microseconds per call (numpy computes it in Python) and runs for every frame."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: header plus a (read-only, zero-copy) array."""

    header: FrameHeader
    array: np.ndarray


def _as_numpy(tensor: Any) -> tuple[np.ndarray, str]:
    """A C-contiguous little-endian numpy view of a numpy array or CPU torch tensor, and
    its dtype's name.

    Raises TensorFrameError for bfloat16, a dtype outside ALLOWED_DTYPES, or an object
    that is no array or tensor.
    """
    if not isinstance(tensor, np.ndarray):
        if hasattr(tensor, "detach") and hasattr(tensor, "numpy"):  # torch, without importing it
            if str(tensor.dtype) == "torch.bfloat16":
                raise TensorFrameError("bfloat16 has no numpy dtype: send float16 or float32")
            tensor = tensor.detach().cpu().contiguous().numpy()
        else:
            raise TensorFrameError(f"cannot send a {type(tensor).__name__} as a tensor frame")
    name = _DTYPE_NAMES.get(tensor.dtype)
    if name is None:  # big-endian or not allowed: the slow way
        name = tensor.dtype.name
        if name not in ALLOWED_DTYPES:
            raise TensorFrameError(f"dtype {tensor.dtype} is not allowed in frames")
    return np.asarray(tensor, dtype=ALLOWED_DTYPES[name], order="C"), name


def encode_frame(header: FrameHeader, tensor: Any, key: bytes | None = None) -> bytes:
    """Header + raw tensor bytes; copies the tensor once (zero extra for contiguous input).
    With ``key``, the header's ``mac`` is set to `frame_mac` under that key (the epoch's
    frame key; hashing costs about 1.6 GB/s, so run a large frame off the event loop);
    without, the header's own ``mac`` (usually empty) is sent as it is.

    Raises TensorFrameError for a dtype outside ALLOWED_DTYPES or a frame over
    MAX_FRAME_BYTES.
    """
    array, dtype_name = _as_numpy(tensor)
    wire_header = _authenticated_fields(header, dtype_name, array.shape)
    body = array.data.cast("B") if array.size else b""
    if key is not None:
        wire_header["mac"] = _mac(key, wire_header, body)
    elif header.mac:  # sent as it is (a forwarded or re-encoded frame keeps its MAC)
        wire_header["mac"] = header.mac
    packed = msgpack.packb(wire_header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise TensorFrameError(f"frame header of {len(packed)} bytes is over {MAX_HEADER_BYTES}")
    start = _PREFIX.size + len(packed)
    padding = b"\0" * (-start % ALIGN_BYTES)
    if start + len(padding) + array.nbytes > MAX_FRAME_BYTES:
        raise TensorFrameError(f"frame of {array.nbytes} tensor bytes is over {MAX_FRAME_BYTES}")
    return b"".join((_PREFIX.pack(MAGIC, len(packed)), packed, padding, body))


def frame_mac(key: bytes, header: FrameHeader, array: np.ndarray) -> bytes:
    """HMAC-SHA256 under ``key`` of everything a frame says but its ``mac``: the msgpack of
    the other header fields (in the model's field order), dtype and shape, then the
    tensor bytes. Sender and receiver compute it from the typed header, so it does not
    depend on how the wire map was ordered.

    Raises TensorFrameError for an array whose dtype is not allowed in frames.
    """
    array, dtype_name = _as_numpy(array)
    body = array.data.cast("B") if array.size else b""
    return _mac(key, _authenticated_fields(header, dtype_name, array.shape), body)


def mac_ok(key: bytes, header: FrameHeader, array: np.ndarray) -> bool:
    """True when ``header.mac`` is the frame's MAC under ``key`` (constant-time compare)."""
    return bool(header.mac) and hmac.compare_digest(frame_mac(key, header, array), header.mac)


def _authenticated_fields(header: FrameHeader, dtype_name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    fields = header.model_dump(exclude={"mac"})
    fields["dtype"] = dtype_name
    fields["shape"] = shape
    return fields


def _mac(key: bytes, fields: dict[str, Any], body: Any) -> bytes:
    digest = hmac.new(key, msgpack.packb(fields, use_bin_type=True), hashlib.sha256)
    digest.update(body)
    return digest.digest()


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
        old_version = OLD_MAGICS.get(bytes(magic))
        if old_version is not None:
            raise TensorFrameError(
                f"the peer speaks tensor frame version {old_version} (magic {bytes(magic)!r}); "
                f"this node speaks version {FRAME_VERSION} ({MAGIC!r}): run the same release "
                "on every node"
            )
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
    header = _checked_header(raw)
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


def _checked_header(raw: dict[str, Any]) -> FrameHeader:
    """The typed header of a wire header map (dtype and shape already taken out).

    Raises TensorFrameError naming the kind and the first bad field.
    """
    kind = raw.get("kind")
    # A dict lookup, not a discriminated-union TypeAdapter: this runs for every frame.
    model = FRAME_KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise TensorFrameError(
            f"unknown frame kind {str(kind)[:32]!r} (version {FRAME_VERSION} has "
            f"{', '.join(sorted(FRAME_KINDS))})"
        )
    try:
        return cast(FrameHeader, model.model_validate(raw))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "header"
        raise TensorFrameError(f"bad {kind} frame header: field {where}: {first['msg']}") from None


def _checked_layout(dtype: Any, shape: Any) -> tuple[np.dtype[Any], tuple[int, ...]]:
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise TensorFrameError(f"dtype {str(dtype)[:32]!r} is not allowed in frames")
    if not isinstance(shape, tuple) or len(shape) > MAX_DIMS:
        raise TensorFrameError(f"shape must be a list of at most {MAX_DIMS} dimensions")
    for dim in shape:
        if type(dim) is not int or dim < 0 or dim > MAX_FRAME_BYTES:
            raise TensorFrameError(f"bad dimension {dim!r} in shape")
    return ALLOWED_DTYPES[dtype], shape


# --- compressed activations --------------------------------------------------------------

ACTIVATION_PRECISIONS = ("fp32", "fp16", "int8")
"""How an activation [T, H] may travel: fp32 (exact, the default), fp16, or int8 with one
float32 scale per row (symmetric, scale = max|row| / 127). The frame's dtype says which:
float32 [T, H], float16 [T, H], or int8 [T, H + 4] whose last 4 bytes per row are the
row's little-endian float32 scale. Bytes per element: 4, 2, 1 (+ 4 per row)."""
_SCALE_BYTES = 4


def activation_bytes_per_element(precision: str) -> float:
    """Wire bytes per activation element at ``precision`` (per-row scales excluded)."""
    return {"fp32": 4.0, "fp16": 2.0, "int8": 1.0}[precision]


def compress_activation(array: np.ndarray, precision: str) -> np.ndarray:
    """float32 [T, H] -> the array to frame at ``precision`` (see ACTIVATION_PRECISIONS).

    Raises TensorFrameError for an unknown precision or an array that is not float32
    [T, H] (fp16 clips to +-65504, int8 to +-127 steps of the row's scale)."""
    if precision not in ACTIVATION_PRECISIONS:
        raise TensorFrameError(f"activation precision must be one of {ACTIVATION_PRECISIONS}, got {precision!r}")
    if array.dtype != np.float32 or array.ndim != 2:
        raise TensorFrameError(f"activations to compress must be float32 [T, H], got {array.dtype}{list(array.shape)}")
    if precision == "fp32":
        return array
    if precision == "fp16":
        half: np.ndarray = np.clip(array, -65504.0, 65504.0).astype(np.float16)
        return half
    scales = np.maximum(np.abs(array).max(axis=1, initial=0.0) / 127.0, np.float32(1e-30))
    values = np.clip(np.rint(array / scales[:, None]), -127, 127).astype(np.int8)
    out = np.empty((array.shape[0], array.shape[1] + _SCALE_BYTES), dtype=np.int8)
    out[:, : array.shape[1]] = values
    out[:, array.shape[1] :] = scales.astype("<f4").view(np.int8).reshape(-1, _SCALE_BYTES)
    return out


def decompress_activation(array: np.ndarray, hidden: int) -> np.ndarray:
    """The float32 [T, hidden] an activation frame's array stands for (a new array unless
    it was float32 already). Raises TensorFrameError for any other dtype or width, or
    int8 rows whose scale is not a finite non-negative float."""
    if array.ndim != 2:
        raise TensorFrameError(f"activation must be 2-D, got {array.dtype}{list(array.shape)}")
    if array.dtype == np.float32 and array.shape[1] == hidden:
        return array
    if array.dtype == np.float16 and array.shape[1] == hidden:
        return array.astype(np.float32)
    if array.dtype == np.int8 and array.shape[1] == hidden + _SCALE_BYTES:
        scales = np.ascontiguousarray(array[:, hidden:]).view("<f4").reshape(-1)
        if not bool(np.all(np.isfinite(scales))) or bool(np.any(scales < 0)):
            raise TensorFrameError("int8 activation frame with a bad row scale")
        return array[:, :hidden].astype(np.float32) * scales[:, None].astype(np.float32)
    raise TensorFrameError(
        f"activation must be float32 or float16 [T, {hidden}] or int8 [T, {hidden + _SCALE_BYTES}], "
        f"got {array.dtype}{list(array.shape)}"
    )


def to_torch(array: np.ndarray) -> Any:
    """A torch tensor sharing ``array``'s memory, without torch's read-only-array warning.

    The tensor must be treated as read-only when the frame came from the network.
    """
    import warnings

    import torch  # imported here: only compute processes need it

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
