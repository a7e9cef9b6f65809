"""Checks of a safetensors file's framing before the safetensors library parses it, so a
malformed file is refused with an error that names its problem.

The library's own errors are terse ("header too large", "invalid offset") and it reads a
header with a repeated tensor name by silently keeping the last entry. ``check_header``
refuses: a file shorter than its length prefix or its header (truncated), a pickle
(protocol 2+ or a torch.save zip) renamed ``.safetensors`` (UnsafeCheckpointError; never
unpickled), a header that is not a JSON object, and a tensor name that appears twice.
Torch-free, like shared/model/manifest.py.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from shared.errors import CheckpointError, UnsafeCheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_PICKLE_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def header_size(where: str, head: bytes, file_bytes: int) -> int:
    """The header length of a file whose first bytes are ``head`` (at least 9 bytes when
    the file has them) and whose size is ``file_bytes``.

    Raises UnsafeCheckpointError for a pickle, CheckpointError for a truncated file or
    a length prefix that is no safetensors header.
    """
    if head.startswith(_PICKLE_MAGICS):
        raise UnsafeCheckpointError(
            f"{where}: is a pickle (or torch.save) file named .safetensors; edgesplit never "
            "loads pickle files: convert it to safetensors on a trusted machine"
        )
    if file_bytes < 8:
        raise CheckpointError(f"{where}: truncated: {file_bytes} bytes, no safetensors header")
    (size,) = struct.unpack_from("<Q", head)
    if size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: not a safetensors file (header length {size})")
    if 8 + size > file_bytes:
        raise CheckpointError(
            f"{where}: truncated: {file_bytes} bytes, but its header alone is {8 + size}"
        )
    if size and head[8:9] != b"{":
        raise CheckpointError(f"{where}: not a safetensors file (no JSON header)")
    return int(size)


def _no_repeats(where: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(f"{where}: tensor {key!r} appears twice in the header")
            seen[key] = value
        return seen

    return hook


def check_header(where: str, data: bytes) -> list[str]:
    """The tensor names of the safetensors bytes ``data``, after the checks above.

    Raises UnsafeCheckpointError or CheckpointError naming ``where`` and the problem.
    """
    size = header_size(where, data[:9], len(data))
    try:
        header = json.loads(data[8 : 8 + size], object_pairs_hook=_no_repeats(where))
    except CheckpointError:
        raise
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{where}: not a safetensors file (bad header: {error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: not a safetensors file (header is not an object)")
    return sorted(name for name in header if name != "__metadata__")


def check_file(path: str) -> list[str]:
    """``check_header`` for a file on disk, reading only its header.

    Raises UnsafeCheckpointError or CheckpointError (also for a file it cannot read).
    """
    try:
        with open(path, "rb") as stream:
            stream.seek(0, 2)
            file_bytes = stream.tell()
            stream.seek(0)
            head = stream.read(9)
            size = header_size(path, head, file_bytes)
            stream.seek(0)
            data = stream.read(8 + size)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror})") from None
    return check_header(path, data)
