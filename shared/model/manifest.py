"""The shard store's manifest (``manifest.json``): per-file sizes and sha256 digests,
and per block the costs the planner needs. Written by shared/model/shard_write.py, read
and verified by shared/model/shard_files.py (torch-free, for the control services) and
served as tensors by shared/model/shard.py (workers).

This module must not import torch: the orchestrator and the split reviser plan from a
manifest alone (tests/unit/test_imports.py checks it)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import CheckpointError, UnsafeCheckpointError
from shared.model.config import detect_architecture, load_config
from shared.model.names import PICKLE_SUFFIXES, block_of

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENTRY_FILE = "entry.safetensors"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_MAX_BYTES = 64 * 1024 * 1024
_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a plain name: no folders, no ".."
_SHA256 = r"^[0-9a-f]{64}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class FileDigest(_Frozen):
    """Size and sha256 of one file of the store."""

    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=_SHA256)


class EntryShard(_Frozen):
    """The tensors outside every block (embeddings, final norm, head)."""

    file: str = Field(pattern=_FILE_NAME)
    tensor_names: tuple[str, ...]


class BlockShard(_Frozen):
    """One transformer block's file and its per-token costs (fp32)."""

    index: int = Field(ge=0)
    file: str = Field(pattern=_FILE_NAME)
    tensor_names: tuple[str, ...] = Field(min_length=1)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=_SHA256)
    parameters: int = Field(ge=0)
    flops_per_token: float = Field(ge=0)  # matrix products, excluding attention over context
    activation_bytes_per_token: int = Field(ge=0)  # hidden state crossing the block's output
    kv_bytes_per_token: int = Field(ge=0)  # K + V cached per token (0 for encoders)


class ShardManifest(_Frozen):
    """The contents of manifest.json."""

    format_version: int
    model_name: str
    architecture: str
    config: dict[str, Any]
    num_blocks: int = Field(ge=1)
    head_flops_per_token: float = Field(ge=0)
    tokenizer_file: str = Field(pattern=_FILE_NAME)
    entry: EntryShard
    files: dict[str, FileDigest]
    blocks: tuple[BlockShard, ...]
    weights: str = Field(default="fp32", pattern=r"^(fp32|bf16|int8|int4)$")
    """How the blocks' linear weights are stored (shared/model/quant.py); the entry file
    (embeddings, norms, head) is always stored as the checkpoint had it."""
    head_input_amax: tuple[float, ...] | None = None
    """int8 / int4 stores: max |x| per channel of the head's input on the calibration
    text (shared/model/calibrate.py), so the entry smooths the head it quantises at load."""
    weight_group_size: int = Field(default=0, ge=0)
    """Input columns sharing one scale: 0 = one scale per output channel (int8), else the
    int4 group (32); 0 for float precisions."""


def parse_manifest(raw: bytes | str, origin: str = MANIFEST_FILE) -> ShardManifest:
    """Validate manifest.json contents. Raises CheckpointError naming the bad field,
    UnsafeCheckpointError if a listed file is pickle-based."""
    try:
        manifest = ShardManifest.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise CheckpointError(f"{origin}: field {field}: {first['msg']}") from None
    _check_manifest(manifest, origin)
    return manifest


def _check_manifest(manifest: ShardManifest, origin: str) -> None:
    """Cross-field checks that a schema cannot express."""

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{origin}: field {field}: {problem}")

    for name in manifest.files:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafeCheckpointError(
                f"{origin}: lists pickle-based file {name!r}; it is never loaded"
            )
        if not re.match(_FILE_NAME, name):
            raise bad("files", f"{name!r} is not a plain file name")
    if manifest.format_version != FORMAT_VERSION:
        raise bad(
            "format_version", f"{manifest.format_version} (this version reads {FORMAT_VERSION})"
        )
    try:
        architecture, layers = (
            detect_architecture(manifest.config),
            load_config(manifest.config).num_layers,
        )
    except (CheckpointError, ValueError) as error:
        raise bad("config", str(error)) from None
    if architecture != manifest.architecture:
        raise bad("architecture", f"{manifest.architecture!r}, but the config is {architecture!r}")
    if manifest.num_blocks != layers or len(manifest.blocks) != layers:
        raise bad(
            "num_blocks",
            f"{manifest.num_blocks} with {len(manifest.blocks)} blocks; config says {layers}",
        )
    weight_files = [manifest.entry.file] + [block.file for block in manifest.blocks]
    for position, block in enumerate(manifest.blocks):
        if block.index != position:
            raise bad(f"blocks.{position}.index", f"{block.index}, expected {position}")
        digest = manifest.files.get(block.file)
        if digest is None or (digest.bytes, digest.sha256) != (block.bytes, block.sha256):
            raise bad(
                f"blocks.{position}.file",
                f"{block.file!r} is not listed in files with the same digest",
            )
    for field, name in (
        ("entry.file", manifest.entry.file),
        ("tokenizer_file", manifest.tokenizer_file),
    ):
        if name not in manifest.files:
            raise bad(field, f"{name!r} is not listed in files")
    _check_tensor_names(manifest, bad)
    if len(set(weight_files)) != len(weight_files) or not all(
        n.endswith(".safetensors") for n in weight_files
    ):
        raise bad("blocks", "weight files must be distinct .safetensors files")


def _check_tensor_names(
    manifest: ShardManifest, bad: Callable[[str, str], CheckpointError]
) -> None:
    """Each tensor is listed once in the whole store, and a block's tensors belong to it
    (a name repeated, or a block file carrying another block's tensor, is refused)."""
    owner: dict[str, str] = {}
    shards = [("entry", None, manifest.entry.tensor_names)] + [
        (f"blocks.{block.index}", block.index, block.tensor_names) for block in manifest.blocks
    ]
    for field, index, names in shards:
        for name in names:
            if name in owner:
                raise bad(f"{field}.tensor_names", f"tensor {name!r} is also listed in {owner[name]}")
            owner[name] = field
            located = block_of(name)
            if (located[0] if located else None) != index:
                where = "outside every block" if located is None else f"in block {located[0]}"
                raise bad(f"{field}.tensor_names", f"tensor {name!r} is {where}")
