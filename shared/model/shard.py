"""Per-block shards of a checkpoint, and the verified store that serves them.

``write_shards`` cuts a Hugging Face folder into ``entry.safetensors`` (everything
outside the blocks), one ``block-NNN.safetensors`` per block (original tensor names),
a copy of ``tokenizer.json`` and ``manifest.json``: the raw config, per-file byte
counts and sha256 digests, and per block the costs the planner needs (FLOPs,
activation bytes and KV bytes per token, from ``ModelConfig``).

``ShardStore`` is a ``TensorSource`` over such a folder. Safetensors has no checksum, so
every file is checked against the manifest's size and sha256 before it is parsed, and
pickle-based files are refused outright (never unpickled). A file once verified is
remembered by (path, inode, size, mtime), so loading it again does not re-hash it.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from shared.errors import (
    CheckpointError,
    ShardVerificationError,
)
from shared.model.config import ModelConfig, load_config
from shared.model.manifest import (
    ENTRY_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MANIFEST_MAX_BYTES,
    TOKENIZER_FILE,
    BlockShard,
    EntryShard,
    FileDigest,
    ShardManifest,
    parse_manifest,
)
from shared.model.names import block_of, canonical_name
from shared.model.shard_write import Progress, write_shards


class ShardStore:
    """A ``TensorSource`` over a shard folder written by ``write_shards``.

    Raises CheckpointError for a missing or invalid manifest (naming the field),
    UnsafeCheckpointError if the manifest lists a pickle-based file, and (when
    ``expected_manifest_sha256`` is given) ShardVerificationError if manifest.json
    does not have that digest.
    """

    def __init__(self, shard_dir: Path, expected_manifest_sha256: str | None = None) -> None:
        self.shard_dir = Path(shard_dir)
        path = self.shard_dir / MANIFEST_FILE
        try:
            with path.open("rb") as stream:
                raw = stream.read(MANIFEST_MAX_BYTES + 1)
        except OSError as error:
            raise CheckpointError(f"{path}: cannot read the shard manifest ({error.strerror})") from None
        if len(raw) > MANIFEST_MAX_BYTES:
            raise CheckpointError(f"{path}: manifest larger than {MANIFEST_MAX_BYTES} bytes")
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        if expected_manifest_sha256 is not None and self.manifest_sha256 != expected_manifest_sha256:
            raise ShardVerificationError(
                f"{path}: sha256 {self.manifest_sha256} does not match the expected {expected_manifest_sha256}"
            )
        self.manifest = parse_manifest(raw, origin=str(path))
        self._config = load_config(self.manifest.config)

    @property
    def config(self) -> ModelConfig:
        """The model's hyper-parameters (from the manifest's raw config)."""
        return self._config

    @property
    def tokenizer_path(self) -> Path:
        """tokenizer.json, verified against the manifest."""
        return self._verified_path(self.manifest.tokenizer_file)

    def entry_tensors(self) -> dict[str, torch.Tensor]:
        """Verified entry tensors (fp32), keyed by canonical name."""
        entry = self.manifest.entry
        tensors = self._load(entry.file, entry.tensor_names)
        return {canonical_name(name): tensor for name, tensor in tensors.items()}

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Verified tensors (fp32) of block ``index``, keyed by name within the block.
        Raises CheckpointError for an index outside ``[0, num_blocks)``."""
        if not 0 <= index < self.manifest.num_blocks:
            raise CheckpointError(f"{self.shard_dir}: no block {index} (the store has {self.manifest.num_blocks})")
        block = self.manifest.blocks[index]
        tensors = self._load(block.file, block.tensor_names)
        return {_within_block(name): tensor for name, tensor in tensors.items()}

    def block_files(self, start: int, end: int) -> tuple[Path, ...]:
        """Paths of the files of blocks ``[start, end)`` (not yet verified).
        Raises CheckpointError for a range outside the store."""
        if not 0 <= start <= end <= self.manifest.num_blocks:
            raise CheckpointError(
                f"{self.shard_dir}: blocks [{start}, {end}) outside [0, {self.manifest.num_blocks})"
            )
        return tuple(self.shard_dir / block.file for block in self.manifest.blocks[start:end])

    def verify_all(self) -> tuple[str, ...]:
        """Check every file the manifest lists; returns their names. Raises
        ShardVerificationError (or CheckpointError for a missing file) on the first
        mismatch."""
        for name in sorted(self.manifest.files):
            self._verified_path(name)
        return tuple(sorted(self.manifest.files))

    def _verified_path(self, name: str) -> Path:
        path = self.shard_dir / name
        if _cached_digest(path) != self.manifest.files[name].sha256:
            self._read_verified(name)
        return path

    def _read_verified(self, name: str) -> bytes:
        """The bytes of ``name``, checked for size (before reading) and sha256."""
        path, expected = self.shard_dir / name, self.manifest.files[name]
        try:
            size = path.stat().st_size
            if size != expected.bytes:
                raise ShardVerificationError(
                    f"{path}: {size} bytes, the manifest says {expected.bytes} (sha256 {expected.sha256})"
                )
            data = path.read_bytes()
        except OSError as error:
            raise CheckpointError(f"{path}: cannot read shard file ({error.strerror})") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected.sha256 or len(data) != expected.bytes:
            raise ShardVerificationError(
                f"{path}: sha256 {actual} does not match the manifest's {expected.sha256}"
            )
        _remember_digest(path, actual)
        return data

    def _load(self, name: str, tensor_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Verified tensors of one file (verified bytes are parsed directly, so the
        file cannot change between check and use)."""
        path = self.shard_dir / name
        if _cached_digest(path) == self.manifest.files[name].sha256:
            tensors = load_file(str(path))
        else:
            tensors = load_safetensors_bytes(self._read_verified(name))
        if sorted(tensors) != sorted(tensor_names):
            raise CheckpointError(f"{path}: tensors {sorted(tensors)} differ from the manifest's")
        for key, value in tensors.items():
            if not value.is_floating_point():
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {value.dtype}; weights must be floating point")
        return {key: value.to(torch.float32) for key, value in tensors.items()}


# --- verification cache -----------------------------------------------------------------

_VERIFIED: dict[tuple[str, int, int, int], str] = {}
_VERIFIED_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple[str, int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _cached_digest(path: Path) -> str | None:
    """The sha256 this process computed for ``path`` if it has not changed since."""
    key = _file_key(path)
    with _VERIFIED_LOCK:
        return None if key is None else _VERIFIED.get(key)


def _remember_digest(path: Path, sha256: str) -> None:
    key = _file_key(path)
    if key is not None:
        with _VERIFIED_LOCK:
            _VERIFIED[key] = sha256


def forget_verified() -> None:
    """Drop every remembered verification (the next load of each file re-hashes)."""
    with _VERIFIED_LOCK:
        _VERIFIED.clear()


def _within_block(name: str) -> str:
    located = block_of(name)
    if located is None:
        raise CheckpointError(f"tensor {name} is not a block tensor")
    return located[1]


__all__ = [
    "ENTRY_FILE", "FORMAT_VERSION", "MANIFEST_FILE", "TOKENIZER_FILE", "BlockShard", "EntryShard",
    "FileDigest", "Progress", "ShardManifest", "ShardStore", "forget_verified", "parse_manifest",
    "write_shards",
]  # fmt: skip
