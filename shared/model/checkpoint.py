"""A Hugging Face checkpoint folder as a ``TensorSource``.

Reads ``config.json``, ``tokenizer.json`` and safetensors weights (``model.safetensors``
or the shards listed in ``model.safetensors.index.json``). Tensors are read by name with
``safe_open``, so a segment materialises only its own blocks. Pickle-based weight files
are never loaded: a folder that has only those raises UnsafeCheckpointError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from shared.errors import CheckpointError, UnsafeCheckpointError
from shared.model import bert, gpt2, llama
from shared.model.config import ModelConfig, load_config
from shared.model.layers import check_finite
from shared.model.names import PICKLE_SUFFIXES, block_of, canonical_name, split_names
from shared.model.safetensors_check import check_file

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_FAMILIES = {"gpt2": gpt2, "llama": llama, "bert": bert}


class Checkpoint:
    """Lazy reader of one HF checkpoint folder; tensors come back as fp32 on the CPU.

    Raises CheckpointError (missing folder or files, unreadable JSON or weights, a tensor
    in a block past ``num_layers``, one tensor under two names) and UnsafeCheckpointError
    (only pickle weights present).
    """

    def __init__(self, model_dir: Path | str) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"model folder {self.model_dir} does not exist")
        self._config = load_config(_read_json(self.model_dir / CONFIG_FILE))
        self._files = _tensor_files(self.model_dir)  # original name -> file
        entry_names, block_names = split_names(self._files)
        self._entry_names = entry_names
        self._block_names = block_names
        self._check_names()

    @property
    def config(self) -> ModelConfig:
        """The model's hyper-parameters from config.json."""
        return self._config

    @property
    def tokenizer_path(self) -> Path:
        """Path of tokenizer.json; raises CheckpointError if the folder has none."""
        path = self.model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{self.model_dir} has no {TOKENIZER_FILE}")
        return path

    def entry_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors outside the blocks, keyed by canonical name (unused heads skipped)."""
        family = _FAMILIES[self._config.architecture]
        wanted = [
            name
            for name in self._entry_names
            if not family.is_unused_entry(self._config, canonical_name(name))
        ]
        return {canonical_name(name): tensor for name, tensor in self._read(wanted).items()}

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors of block ``index`` keyed by name within the block.

        Raises CheckpointError when the index is outside ``[0, num_layers)``, or naming
        the file and tensor for a NaN or infinite weight.
        """
        if not 0 <= index < self._config.num_layers:
            raise CheckpointError(
                f"{self.model_dir}: no block {index} (the model has {self._config.num_layers})"
            )
        names = self._block_names.get(index, [])
        return {_within_block(name): tensor for name, tensor in self._read(names).items()}

    def _check_names(self) -> None:
        layers = self._config.num_layers
        for index, names in sorted(self._block_names.items()):
            if index >= layers:
                raise CheckpointError(
                    f"{self.model_dir}: unexpected tensor {names[0]!r}: block {index}, "
                    f"but config.json has {layers} layers"
                )
        seen: dict[str, str] = {}
        for name in sorted(self._files):
            canonical = canonical_name(name)
            if canonical in seen:
                raise CheckpointError(
                    f"{self.model_dir}: tensor {canonical!r} appears twice ({seen[canonical]!r}, {name!r})"
                )
            seen[canonical] = name

    def _read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._files[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, file_names in sorted(by_file.items()):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    present = set(handle.keys())
                    for name in file_names:
                        if name not in present:
                            raise CheckpointError(
                                f"{path}: tensor {name!r} listed in the index is missing"
                            )
                        tensors[name] = _as_fp32(name, handle.get_tensor(name))
                        check_finite(str(path), name, tensors[name])
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{path}: cannot read weights: {error}") from None
        return tensors


def _within_block(name: str) -> str:
    located = block_of(name)
    if located is None:  # split_names put it in a block, so this cannot happen
        raise CheckpointError(f"tensor {name!r} is not in a block")
    return located[1]


def _as_fp32(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"tensor {name!r} has dtype {tensor.dtype}; weights must be floating point"
        )
    return tensor.to(torch.float32)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not readable JSON: {error}") from None


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Original tensor name -> safetensors file holding it. Refuses pickle-only folders."""
    single, index = model_dir / WEIGHTS_FILE, model_dir / WEIGHTS_INDEX_FILE
    if single.is_file():
        return {name: single for name in _header_names(single)}
    if index.is_file():
        return _indexed_files(model_dir, _read_json(index))
    pickles = sorted(path.name for path in model_dir.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{model_dir} has only pickle weights ({', '.join(pickles)}); edgesplit never loads "
            f"pickle files: convert them to {WEIGHTS_FILE} on a trusted machine"
        )
    raise CheckpointError(f"{model_dir} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")


def _header_names(path: Path) -> list[str]:
    check_file(str(path))  # a truncated file, a renamed pickle, a repeated tensor name
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None


def _indexed_files(model_dir: Path, index: Any) -> dict[str, Path]:
    weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{model_dir / WEIGHTS_INDEX_FILE}: no weight_map")
    files: dict[str, Path] = {}
    for name, file_name in weight_map.items():
        if (
            not isinstance(file_name, str)
            or Path(file_name).name != file_name
            or not file_name.endswith(".safetensors")
        ):
            raise CheckpointError(
                f"{WEIGHTS_INDEX_FILE}: tensor {name!r} maps to a bad file {file_name!r}"
            )
        path = model_dir / file_name
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: {file_name} (holding {name!r}) is missing")
        files[str(name)] = path
    for path in sorted(set(files.values())):
        check_file(str(path))
    return files
