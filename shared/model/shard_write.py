"""Writing a shard store: ``write_shards`` cuts a Hugging Face folder into per-block
safetensors files with a sha256 manifest (shared/model/manifest.py; the reader is
shared/model/shard.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.errors import CheckpointError, ConfigError
from shared.model import bert, gpt2, llama
from shared.model.checkpoint import WEIGHTS_FILE, WEIGHTS_INDEX_FILE, Checkpoint
from shared.model.config import ModelConfig
from shared.model.manifest import (
    ENTRY_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    BlockShard,
    EntryShard,
    FileDigest,
    ShardManifest,
)
from shared.model.names import block_of, split_names
from shared.model.quant import (
    INT4_GROUP_SIZE,
    QUANTISED,
    WeightPrecision,
    precision_of,
    stored_form,
)
from shared.model.quant_fusion import joint_weight_amax

Progress = Callable[[str], None]
_FAMILIES = {"gpt2": gpt2, "llama": llama, "bert": bert}


def write_shards(
    model_dir: Path, out_dir: Path, progress: Progress | None = None,
    model_name: str | None = None, weights: str = "fp32",
) -> Path:  # fmt: skip
    """Cut the checkpoint in ``model_dir`` into a shard store at ``out_dir``; returns
    the manifest's path. The store is built in a temporary sibling and renamed into
    place; an existing shard store at ``out_dir`` is replaced. ``weights`` (fp32, bf16,
    int8, int4) is how the blocks' linear weights are stored (shared/model/quant.py:
    int8 / int4 values plus fp32 ``NAME_scale`` tensors); the entry file is copied as is.

    Raises CheckpointError for a folder without config.json, tokenizer.json or
    safetensors weights (or with missing blocks), UnsafeCheckpointError when it only
    has pickle weights, ConfigError when ``out_dir`` holds something that is not a
    shard store.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    precision = precision_of(weights)
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
        raise ConfigError(
            f"cannot create {out_dir}: {error.strerror or error}; choose another --out"
        ) from None
    try:
        ranges, head_amax = _calibration(checkpoint, precision, report)
        files, blocks = _write_weights(
            staging, entry_names, block_names, locations, config, report, precision, ranges
        )
        shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        files[TOKENIZER_FILE] = _digest(staging / TOKENIZER_FILE)
        manifest = ShardManifest(
            format_version=FORMAT_VERSION,
            model_name=model_name or model_dir.resolve().name,
            architecture=config.architecture,
            config=dict(raw_config),
            num_blocks=config.num_layers,
            head_flops_per_token=config.head_flops_per_token(),
            tokenizer_file=TOKENIZER_FILE,
            entry=EntryShard(file=ENTRY_FILE, tensor_names=tuple(entry_names)),
            files=files,
            blocks=tuple(blocks),
            weights=precision,
            head_input_amax=None if head_amax is None else tuple(float(v) for v in head_amax),
            weight_group_size=INT4_GROUP_SIZE if precision == "int4" else 0,
        )
        (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        staging.chmod(0o755)
        _swap_into_place(staging, out_dir)
    except OSError as error:
        raise ConfigError(
            f"writing {out_dir} failed: {error.strerror or error}; check free disk space"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / MANIFEST_FILE


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
    precision: WeightPrecision = "fp32",
    ranges: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, FileDigest], list[BlockShard]]:
    """Write entry.safetensors and one file per block; returns their digests and blocks."""
    linears = _FAMILIES[config.architecture].linear_weights(config)
    groups = _FAMILIES[config.architecture].fused_linears(config)
    files = {ENTRY_FILE: _write_tensor_file(staging / ENTRY_FILE, entry_names, locations)}
    report(f"wrote {ENTRY_FILE} ({files[ENTRY_FILE].bytes / 1e6:.1f} MB)")
    blocks = []
    for index in range(config.num_layers):
        name = f"block-{index:03d}.safetensors"
        files[name], names = _write_block_file(
            staging / name, block_names[index], locations, linears, precision,
            (ranges or {}).get(index, {}), groups,
        )  # fmt: skip
        blocks.append(_block_shard(index, name, names, files[name], config))
        report(
            f"wrote block {index + 1}/{config.num_layers} ({100 * (index + 1) // config.num_layers}%)"
        )
    return files, blocks


def _calibration(
    checkpoint: Checkpoint, precision: WeightPrecision, report: Progress
) -> tuple[dict[int, dict[str, torch.Tensor]] | None, torch.Tensor | None]:
    """Calibration ranges for an int8 / int4 store (one fp32 pass; shared/model/calibrate.py)."""
    if precision not in ("int8", "int4"):
        return None, None
    from shared.model.calibrate import input_ranges
    from shared.model.pipeline import LocalPipeline

    report("calibrating the activation ranges (one fp32 pass)")
    return input_ranges(LocalPipeline(checkpoint))


def _read_tensors(names: list[str], locations: Mapping[str, Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted({locations[name] for name in names}):
        with safe_open(str(file), framework="pt") as handle:
            for name in names:
                if locations[name] == file:
                    tensors[name] = handle.get_tensor(name).contiguous()
    return tensors


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> FileDigest:
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)
    return _digest(path)


def _write_tensor_file(path: Path, names: list[str], locations: Mapping[str, Path]) -> FileDigest:
    return _save(path, _read_tensors(names, locations))


def _write_block_file(
    path: Path, names: list[str], locations: Mapping[str, Path],
    linears: Mapping[str, bool], precision: WeightPrecision,
    input_amax: Mapping[str, torch.Tensor], groups: Sequence[Sequence[str]] = (),
) -> tuple[FileDigest, list[str]]:  # fmt: skip
    """One block's file with its linear weights in ``precision``; returns its digest and
    tensor names (scales included, sorted). The linears of a fused group (quant_fusion.py)
    are smoothed with the group's joint weight range, so they load as one kernel."""
    tensors = _read_tensors(names, locations)
    joint: dict[str, torch.Tensor] = {}
    if precision in QUANTISED and input_amax:
        local = {located[1]: tensors[name] for name in tensors
                 if (located := block_of(name)) is not None and linears.get(located[1]) is False}  # fmt: skip
        joint = joint_weight_amax(local, groups)
    if precision != "fp32":
        for name in list(tensors):
            located = block_of(name)
            if located is None or located[1] not in linears:
                continue
            weight = tensors.pop(name)
            if linears[located[1]] and precision != "bf16":
                weight = weight.T  # quantised values are always [out, in]
            amax, weight_amax = input_amax.get(located[1]), joint.get(located[1])
            for suffix, tensor in stored_form(weight, precision, amax, weight_amax).items():
                tensors[name + suffix] = tensor
    return _save(path, tensors), sorted(tensors)


def _digest(path: Path) -> FileDigest:
    with path.open("rb") as stream:
        sha256 = hashlib.file_digest(stream, "sha256").hexdigest()
    return FileDigest(bytes=path.stat().st_size, sha256=sha256)


def _block_shard(
    index: int, file: str, names: list[str], digest: FileDigest, config: ModelConfig
) -> BlockShard:
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
