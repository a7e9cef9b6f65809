"""Checkpoint folders: what is loaded, what is refused, and the messages that say why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.errors import (
    CheckpointError,
    ConfigError,
    ContextTooLong,
    UnsafeCheckpointError,
    UnsupportedArchitecture,
)
from shared.model.checkpoint import Checkpoint
from shared.model.config import load_config
from shared.model.pipeline import LocalPipeline, segment_ranges
from shared.model.runtime import EntryRuntime, SegmentRuntime
from shared.model.source import TensorSource
from shared.model.tiny import write_tiny_checkpoint


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    return write_tiny_checkpoint("llama", tmp_path / "llama", layers=4, seed=3)


def _rewrite(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_checkpoint_is_a_tensor_source_with_canonical_names(llama_dir: Path) -> None:
    checkpoint = Checkpoint(llama_dir)
    assert isinstance(checkpoint, TensorSource)
    assert sorted(checkpoint.entry_tensors()) == ["embed_tokens.weight", "norm.weight"]
    block = checkpoint.block_tensors(2)
    assert "self_attn.q_proj.weight" in block and block["self_attn.k_proj.weight"].shape == (32, 64)
    assert checkpoint.tokenizer_path.name == "tokenizer.json"
    with pytest.raises(CheckpointError, match="no block 4"):
        checkpoint.block_tensors(4)


def test_pickle_weights_are_refused_never_loaded(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint("gpt2", tmp_path / "gpt2", layers=1)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not even a real pickle")
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        Checkpoint(folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(folder)


def test_missing_tensor_is_named(llama_dir: Path) -> None:
    _rewrite(llama_dir, lambda tensors: tensors.pop("model.layers.2.mlp.up_proj.weight"))
    SegmentRuntime(Checkpoint(llama_dir), 0, 2)  # blocks 0 and 1 are intact
    with pytest.raises(CheckpointError, match=r"block 2: tensor 'mlp.up_proj.weight' is missing"):
        SegmentRuntime(Checkpoint(llama_dir), 2, 4)


def test_unexpected_and_misshaped_tensors_are_named(llama_dir: Path) -> None:
    _rewrite(
        llama_dir, lambda tensors: tensors.update({"model.layers.1.extra.weight": torch.zeros(2)})
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'extra.weight'"):
        SegmentRuntime(Checkpoint(llama_dir), 1, 2)
    _rewrite(llama_dir, lambda tensors: tensors.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"'norm.weight' has shape \(63,\), expected \(64,\)"):
        EntryRuntime(Checkpoint(llama_dir))
    _rewrite(
        llama_dir,
        lambda tensors: tensors.update({"model.layers.9.input_layernorm.weight": torch.ones(64)}),
    )
    with pytest.raises(CheckpointError, match="layers.9.input_layernorm.weight"):
        Checkpoint(llama_dir)


def test_untied_model_needs_its_head(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint(
        "llama", tmp_path / "untied", layers=1, tie_word_embeddings=False
    )
    _rewrite(folder, lambda tensors: tensors.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        EntryRuntime(Checkpoint(folder))


def test_sharded_index_loads_the_same_model(llama_dir: Path, tmp_path: Path) -> None:
    reference = LocalPipeline(llama_dir).logits([1, 5, 9, 20])
    tensors = load_file(str(llama_dir / "model.safetensors"))
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file_name, part in halves.items():
        save_file({name: tensors[name] for name in part}, str(llama_dir / file_name))
    weight_map = {name: file_name for file_name, part in halves.items() for name in part}
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (llama_dir / "model.safetensors").unlink()
    torch.testing.assert_close(
        LocalPipeline(llama_dir, (2,)).logits([1, 5, 9, 20]), reference, atol=1e-6, rtol=0
    )
    weight_map[names[0]] = "../elsewhere.safetensors"
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="bad file"):
        Checkpoint(llama_dir)


@pytest.mark.parametrize(
    ("splits", "named"),
    [
        ((0,), "split 0"),
        ((4,), "split 4"),
        ((2, 2), "split 2"),
        ((3, 1), "split 1"),
        ((-1,), "split -1"),
    ],
)
def test_bad_splits_are_rejected_naming_the_value(splits: tuple, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        segment_ranges(4, splits)


def test_segment_ranges_are_half_open() -> None:
    assert segment_ranges(16, (4, 12)) == [(0, 4), (4, 12), (12, 16)]
    assert segment_ranges(3, ()) == [(0, 3)]


def test_context_too_long_is_refused_before_compute(llama_dir: Path) -> None:
    pipeline = LocalPipeline(llama_dir)
    with pytest.raises(ContextTooLong, match="256"):
        pipeline.generate([1] * 250, 7)
    with pytest.raises(ConfigError, match="empty"):
        pipeline.generate([], 4)
    with pytest.raises(ConfigError, match="token id 400"):
        pipeline.generate([1, 400], 4)


def test_config_families_and_refusals() -> None:
    base = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 4096,
    }
    mistral = load_config(
        {
            **base,
            "model_type": "mistral",
            "num_key_value_heads": 2,
            "sliding_window": 1024,
            "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
            "eos_token_id": [2, 3],
        }
    )
    assert (mistral.architecture, mistral.max_positions, mistral.rope_theta) == ("llama", 1024, 1e6)
    assert (
        mistral.eos_token_ids == (2, 3) and mistral.kv_bytes_per_token_per_block() == 2 * 2 * 16 * 4
    )
    assert mistral.activation_bytes_per_token() == 256
    assert mistral.flops_per_token_per_block(100) > mistral.flops_per_token_per_block(0) > 0
    with pytest.raises(UnsupportedArchitecture, match="t5"):
        load_config({**base, "model_type": "t5"})
    with pytest.raises(UnsupportedArchitecture, match="yarn"):
        load_config({**base, "model_type": "llama", "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        load_config({**base, "model_type": "llama", "num_key_value_heads": 3})
    with pytest.raises(CheckpointError, match="vocab_size"):
        load_config({k: v for k, v in {**base, "model_type": "bert"}.items() if k != "vocab_size"})
