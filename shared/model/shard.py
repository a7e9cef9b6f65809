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
import json
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file, save_file

from shared.errors import (
    CheckpointError,
    ConfigError,
    ShardVerificationError,
    UnsafeCheckpointError,
)
from shared.model.checkpoint import PICKLE_SUFFIXES, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, Checkpoint
from shared.model.config import ModelConfig, detect_architecture, load_config
from shared.model.names import block_of, canonical_name, split_names

Progress = Callable[[str], None]

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENTRY_FILE = "entry.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_MANIFEST_MAX_BYTES = 64 * 1024 * 1024
_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a plain name: no folders, no ".."
_SHA256 = r"^[0-9a-f]{64}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


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


def write_shards(
    model_dir: Path, out_dir: Path, progress: Progress | None = None, model_name: str | None = None
) -> Path:
    """Cut the checkpoint in ``model_dir`` into a shard store at ``out_dir``; returns
    the manifest's path. The store is built in a temporary sibling and renamed into
    place; an existing shard store at ``out_dir`` is replaced.

    Raises CheckpointError for a folder without config.json, tokenizer.json or
    safetensors weights (or with missing blocks), UnsafeCheckpointError when it only
    has pickle weights, ConfigError when ``out_dir`` holds something that is not a
    shard store.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    report = progress or (lambda _line: None)
    checkpoint = Checkpoint(model_dir)  # validates config, tensor names; refuses pickles
    config, tokenizer = checkpoint.config, checkpoint.tokenizer_path
    raw_config = _read_json(model_dir / "config.json")
    locations = _tensor_locations(model_dir)
    entry_names, block_names = split_names(locations)
    if sorted(block_names) != list(range(config.num_layers)):
        raise CheckpointError(
            f"{model_dir}: config.json says {config.num_layers} blocks, the weights hold blocks "
            f"{sorted(block_names)}"
        )
    _check_replaceable(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as error:
        raise ConfigError(f"cannot create {out_dir}: {error.strerror or error}; choose another --out") from None
    try:
        files, blocks = _write_weights(staging, entry_names, block_names, locations, config, report)
        shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        files[TOKENIZER_FILE] = _digest(staging / TOKENIZER_FILE)
        manifest = ShardManifest(
            format_version=FORMAT_VERSION, model_name=model_name or model_dir.resolve().name,
            architecture=config.architecture, config=dict(raw_config), num_blocks=config.num_layers,
            head_flops_per_token=config.head_flops_per_token(), tokenizer_file=TOKENIZER_FILE,
            entry=EntryShard(file=ENTRY_FILE, tensor_names=tuple(entry_names)),
            files=files, blocks=tuple(blocks),
        )
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        staging.chmod(0o755)
        _swap_into_place(staging, out_dir)
    except OSError as error:
        raise ConfigError(f"writing {out_dir} failed: {error.strerror or error}; check free disk space") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / MANIFEST_FILE


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
                raw = stream.read(_MANIFEST_MAX_BYTES + 1)
        except OSError as error:
            raise CheckpointError(f"{path}: cannot read the shard manifest ({error.strerror})") from None
        if len(raw) > _MANIFEST_MAX_BYTES:
            raise CheckpointError(f"{path}: manifest larger than {_MANIFEST_MAX_BYTES} bytes")
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
            raise UnsafeCheckpointError(f"{origin}: lists pickle-based file {name!r}; it is never loaded")
        if not re.match(_FILE_NAME, name):
            raise bad("files", f"{name!r} is not a plain file name")
    if manifest.format_version != FORMAT_VERSION:
        raise bad("format_version", f"{manifest.format_version} (this version reads {FORMAT_VERSION})")
    try:
        architecture, layers = detect_architecture(manifest.config), load_config(manifest.config).num_layers
    except (CheckpointError, ValueError) as error:
        raise bad("config", str(error)) from None
    if architecture != manifest.architecture:
        raise bad("architecture", f"{manifest.architecture!r}, but the config is {architecture!r}")
    if manifest.num_blocks != layers or len(manifest.blocks) != layers:
        raise bad("num_blocks", f"{manifest.num_blocks} with {len(manifest.blocks)} blocks; config says {layers}")
    weight_files = [manifest.entry.file] + [block.file for block in manifest.blocks]
    for position, block in enumerate(manifest.blocks):
        if block.index != position:
            raise bad(f"blocks.{position}.index", f"{block.index}, expected {position}")
        digest = manifest.files.get(block.file)
        if digest is None or (digest.bytes, digest.sha256) != (block.bytes, block.sha256):
            raise bad(f"blocks.{position}.file", f"{block.file!r} is not listed in files with the same digest")
    for field, name in (("entry.file", manifest.entry.file), ("tokenizer_file", manifest.tokenizer_file)):
        if name not in manifest.files:
            raise bad(field, f"{name!r} is not listed in files")
    if len(set(weight_files)) != len(weight_files) or not all(n.endswith(".safetensors") for n in weight_files):
        raise bad("blocks", "weight files must be distinct .safetensors files")


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


# --- writing ----------------------------------------------------------------------------


def _read_json(path: Path) -> Mapping[str, Any]:
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror})") from None
    except ValueError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return value


def _tensor_locations(model_dir: Path) -> dict[str, Path]:
    """Original tensor name -> the safetensors file holding it (the folder has been
    validated by ``Checkpoint``: one model.safetensors, or the files of its index)."""
    single = model_dir / WEIGHTS_FILE
    if single.is_file():
        files = [single]
    else:
        index = _read_json(model_dir / WEIGHTS_INDEX_FILE)
        files = sorted({model_dir / str(name) for name in index["weight_map"].values()})
    locations: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            locations.update((name, file) for name in handle.keys())
    return locations


def _write_weights(
    staging: Path,
    entry_names: list[str],
    block_names: Mapping[int, list[str]],
    locations: Mapping[str, Path],
    config: ModelConfig,
    report: Progress,
) -> tuple[dict[str, FileDigest], list[BlockShard]]:
    """Write entry.safetensors and one file per block; returns their digests and blocks."""
    files = {ENTRY_FILE: _write_tensor_file(staging / ENTRY_FILE, entry_names, locations)}
    report(f"wrote {ENTRY_FILE} ({files[ENTRY_FILE].bytes / 1e6:.1f} MB)")
    blocks = []
    for index in range(config.num_layers):
        name = f"block-{index:03d}.safetensors"
        files[name] = _write_tensor_file(staging / name, block_names[index], locations)
        blocks.append(_block_shard(index, name, block_names[index], files[name], config))
        report(f"wrote block {index + 1}/{config.num_layers} ({100 * (index + 1) // config.num_layers}%)")
    return files, blocks


def _write_tensor_file(path: Path, names: list[str], locations: Mapping[str, Path]) -> FileDigest:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({locations[name] for name in names}):
        with safe_open(str(file), framework="pt") as handle:
            for name in names:
                if locations[name] == file:
                    tensors[name] = handle.get_tensor(name).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)
    return _digest(path)


def _digest(path: Path) -> FileDigest:
    with path.open("rb") as stream:
        sha256 = hashlib.file_digest(stream, "sha256").hexdigest()
    return FileDigest(bytes=path.stat().st_size, sha256=sha256)


def _block_shard(index: int, file: str, names: list[str], digest: FileDigest, config: ModelConfig) -> BlockShard:
    return BlockShard(
        index=index,
        file=file,
        tensor_names=tuple(names),
        bytes=digest.bytes,
        sha256=digest.sha256,
        parameters=config.block_parameter_count(),
        flops_per_token=config.flops_per_token_per_block(context_tokens=0),
        activation_bytes_per_token=config.activation_bytes_per_token(),
        kv_bytes_per_token=config.kv_bytes_per_token_per_block(),
    )


def _within_block(name: str) -> str:
    located = block_of(name)
    if located is None:
        raise CheckpointError(f"tensor {name} is not a block tensor")
    return located[1]


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty folder or an earlier shard store may be replaced. Raises ConfigError."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise ConfigError(f"{out_dir} is not empty and is not a shard store; choose another --out")


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(retired / "store")
        shutil.rmtree(retired, ignore_errors=True)
    staging.rename(out_dir)
