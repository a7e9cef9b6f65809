"""Per-block shards of a checkpoint, and the verified store that serves their tensors.

``write_shards`` (shared/model/shard_write.py) cuts a Hugging Face folder into
``entry.safetensors`` (everything outside the blocks), one ``block-NNN.safetensors`` per
block (original tensor names), a copy of ``tokenizer.json`` and ``manifest.json``: the
raw config, per-file byte counts and sha256 digests, and per block the costs the planner
needs (FLOPs, activation bytes and KV bytes per token, from ``ModelConfig``).

``ShardStore`` is a ``TensorSource`` over such a folder, for workers: it imports torch.
Reading and verifying the manifest and the files is ``ShardFiles``
(shared/model/shard_files.py), which does not, so the control services use that instead.
Safetensors has no checksum, so every file is checked against the manifest's size and
sha256 before it is parsed, and pickle-based files are refused outright (never
unpickled).
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from shared.errors import CheckpointError
from shared.model.layers import check_finite
from shared.model.manifest import (
    ENTRY_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    BlockShard,
    EntryShard,
    FileDigest,
    ShardManifest,
    parse_manifest,
)
from shared.model.names import block_of, canonical_name
from shared.model.quant import OUTLIER_SUFFIX, ROTATION_SUFFIX, SCALE_SUFFIX
from shared.model.safetensors_check import check_file, check_header
from shared.model.shard_files import ShardFiles, forget_verified
from shared.model.shard_write import Progress, write_shards

_QUANTISED_DTYPES = (torch.int8, torch.uint8)  # int8 values; int4 packed two a byte


class ShardStore(ShardFiles):
    """A ``TensorSource`` over a shard folder written by ``write_shards``.

    Raises what ``ShardFiles`` raises on construction: CheckpointError for a missing or
    invalid manifest (naming the field), UnsafeCheckpointError if the manifest lists a
    pickle-based file, and (when ``expected_manifest_sha256`` is given)
    ShardVerificationError if manifest.json does not have that digest.
    """

    @property
    def weight_precision(self) -> str:
        """How the blocks' linear weights are stored (manifest ``weights``: fp32, bf16,
        int8, int4; shared/model/quant.py)."""
        return self.manifest.weights

    @property
    def head_input_amax(self) -> tuple[float, ...] | None:
        """Calibration ranges of the head's input (int8 / int4 stores), else None."""
        return self.manifest.head_input_amax

    def entry_tensors(self) -> dict[str, torch.Tensor]:
        """Verified entry tensors (fp32), keyed by canonical name."""
        entry = self.manifest.entry
        tensors = self._load(entry.file, entry.tensor_names)
        canonical: dict[str, torch.Tensor] = {}
        for name, tensor in sorted(tensors.items()):
            if canonical_name(name) in canonical:
                raise CheckpointError(
                    f"{self.shard_dir / entry.file}: tensor {canonical_name(name)!r} appears "
                    f"twice (as {name!r} and another name)"
                )
            canonical[canonical_name(name)] = tensor
        return canonical

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Verified tensors of block ``index``, keyed by name within the block: fp32, or as
        the manifest's ``weights`` stores linear weights (bf16; int8 or packed int4 values
        with fp32 ``NAME_scale`` scales, and int64 ``NAME_outliers`` channels).
        Raises CheckpointError for an index outside ``[0, num_blocks)``."""
        if not 0 <= index < self.manifest.num_blocks:
            raise CheckpointError(f"{self.shard_dir}: no block {index} (the store has {self.manifest.num_blocks})")
        block = self.manifest.blocks[index]
        tensors = self._load(block.file, block.tensor_names)
        within: dict[str, torch.Tensor] = {}
        for name, tensor in sorted(tensors.items()):
            located = block_of(name)
            if located is None or located[0] != index:
                raise CheckpointError(
                    f"{self.shard_dir / block.file}: tensor {name!r} is not a tensor of block {index}"
                )
            if located[1] in within:
                raise CheckpointError(
                    f"{self.shard_dir / block.file}: tensor {located[1]!r} of block {index} "
                    f"appears twice (as {name!r} and another name)"
                )
            within[located[1]] = tensor
        return within

    def _load(self, name: str, tensor_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Verified tensors of one file (verified bytes are parsed directly, so the
        file cannot change between check and use). Raises CheckpointError naming the file
        and tensor for a tensor list that differs from the manifest's, an integer tensor,
        or a NaN or infinite weight, and naming the file for a truncated or corrupt file
        or a tensor name its header repeats; UnsafeCheckpointError for a pickle named
        .safetensors (shared/model/safetensors_check.py)."""
        path = self.shard_dir / name
        try:
            if self._verified_before(name):
                check_file(str(path))
                tensors = load_file(str(path))
            else:
                data = self._read_verified(name)
                check_header(str(path), data)
                tensors = load_safetensors_bytes(data)
        except SafetensorError as error:
            raise CheckpointError(
                f"{path}: not a valid safetensors file, truncated or corrupt ({error})"
            ) from None
        if sorted(tensors) != sorted(tensor_names):
            raise CheckpointError(f"{path}: tensors {sorted(tensors)} differ from the manifest's")
        quantised = self.manifest.weights in ("int8", "int4")
        for key, value in tensors.items():
            integer_ok = quantised and (
                (value.dtype in _QUANTISED_DTYPES and key + SCALE_SUFFIX in tensors)
                or (value.dtype == torch.int64 and any(
                    key.endswith(suffix) and key[: -len(suffix)] + SCALE_SUFFIX in tensors
                    for suffix in (OUTLIER_SUFFIX, ROTATION_SUFFIX)))
            )  # fmt: skip
            if not value.is_floating_point() and not integer_ok:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {value.dtype}; weights must be floating point")
        keep_bf16 = self.manifest.weights == "bf16"
        loaded = {
            key: value if not value.is_floating_point() or (keep_bf16 and value.dtype == torch.bfloat16)
            else value.to(torch.float32)
            for key, value in tensors.items()
        }  # fmt: skip
        for key, value in sorted(loaded.items()):
            if value.is_floating_point():
                check_finite(str(path), key, value)
        return loaded


__all__ = [
    "ENTRY_FILE", "FORMAT_VERSION", "MANIFEST_FILE", "TOKENIZER_FILE", "BlockShard", "EntryShard",
    "FileDigest", "Progress", "ShardFiles", "ShardManifest", "ShardStore", "forget_verified",
    "parse_manifest", "write_shards",
]  # fmt: skip
