"""Shard stores: writing, verification, pickle refusal, manifest numbers, exact inference."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.errors import (
    CheckpointError,
    ConfigError,
    ShardVerificationError,
    UnsafeCheckpointError,
)
from shared.model import shard_files as shard
from shared.model.checkpoint import Checkpoint
from shared.model.pipeline import LocalPipeline
from shared.model.shard import ShardStore, forget_verified, write_shards
from shared.model.tiny import write_tiny_checkpoint

_SENTINEL_ENV = "EDGESPLIT_TEST_UNPICKLED"


class _Booby:
    """Unpickling this object writes a file: proof that something unpickled it."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f'touch "${_SENTINEL_ENV}"',))


@pytest.fixture(autouse=True)
def _fresh_verification_cache() -> Iterator[None]:
    forget_verified()
    yield
    forget_verified()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), layers=4, seed=3)


@pytest.fixture
def store_dir(tiny_llama: Path, tmp_path: Path) -> Path:
    write_shards(tiny_llama, tmp_path / "store")
    return tmp_path / "store"


def _flip_bit(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "bert"])
def test_store_serves_the_checkpoints_tensors(architecture: str, tmp_path: Path) -> None:
    model_dir = write_tiny_checkpoint(architecture, tmp_path / "model", layers=3, seed=1)
    lines: list[str] = []
    manifest_path = write_shards(model_dir, tmp_path / "store", progress=lines.append)
    assert manifest_path == tmp_path / "store" / "manifest.json"
    assert len([line for line in lines if "block" in line]) == 3
    names = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert names == ["block-000.safetensors", "block-001.safetensors", "block-002.safetensors",
                     "entry.safetensors", "manifest.json", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    checkpoint, store = Checkpoint(model_dir), ShardStore(tmp_path / "store")
    assert store.config == checkpoint.config
    entry = store.entry_tensors()
    for name, tensor in checkpoint.entry_tensors().items():
        assert torch.equal(entry[name], tensor), name
    for index in range(3):
        expected, actual = checkpoint.block_tensors(index), store.block_tensors(index)
        assert sorted(actual) == sorted(expected)
        assert all(torch.equal(actual[name], expected[name]) for name in expected)
    assert store.tokenizer_path.read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert store.verify_all() == tuple(sorted(store.manifest.files))


def test_block_files_keep_original_tensor_names(store_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(store_dir / "block-002.safetensors"), framework="pt") as handle:
        assert all(name.startswith("model.layers.2.") for name in handle.keys())
    store = ShardStore(store_dir)
    assert store.block_files(1, 3) == (store_dir / "block-001.safetensors", store_dir / "block-002.safetensors")
    assert store.block_files(2, 2) == ()
    with pytest.raises(CheckpointError):
        store.block_files(3, 5)
    with pytest.raises(CheckpointError, match="no block 4"):
        store.block_tensors(4)


def test_manifest_numbers_for_a_known_config(store_dir: Path) -> None:
    manifest = json.loads((store_dir / "manifest.json").read_text())
    store = ShardStore(store_dir)
    config = manifest["config"]
    assert (config["hidden_size"], config["num_key_value_heads"], config["num_attention_heads"]) == (64, 2, 4)
    head_dim = 64 // 4
    assert manifest["architecture"] == "llama" and manifest["num_blocks"] == 4
    for index, block in enumerate(manifest["blocks"]):
        path = store_dir / block["file"]
        assert block["index"] == index and block["file"] == f"block-{index:03d}.safetensors"
        assert block["bytes"] == path.stat().st_size
        assert block["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert block["kv_bytes_per_token"] == 2 * 2 * head_dim * 4  # K and V, 2 KV heads, fp32
        assert block["activation_bytes_per_token"] == 64 * 4
        parameters = sum(tensor.numel() for tensor in store.block_tensors(index).values())
        assert block["parameters"] == parameters
        assert block["flops_per_token"] == 2 * parameters
    for name, digest in manifest["files"].items():
        assert digest["bytes"] == (store_dir / name).stat().st_size
        assert digest["sha256"] == hashlib.sha256((store_dir / name).read_bytes()).hexdigest()


def test_one_flipped_bit_fails_verification(store_dir: Path) -> None:
    _flip_bit(store_dir / "block-002.safetensors")
    store = ShardStore(store_dir)
    expected = store.manifest.blocks[2].sha256
    actual = hashlib.sha256((store_dir / "block-002.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ShardVerificationError) as caught:
        store.block_tensors(2)
    message = str(caught.value)
    assert "block-002.safetensors" in message and expected in message and actual in message
    assert store.block_tensors(1)  # the other blocks still load
    with pytest.raises(ShardVerificationError, match="block-002"):
        store.verify_all()


def test_changed_size_and_missing_file_fail(store_dir: Path) -> None:
    with (store_dir / "entry.safetensors").open("ab") as stream:
        stream.write(b"\0")
    with pytest.raises(ShardVerificationError, match="entry.safetensors.*bytes"):
        ShardStore(store_dir).entry_tensors()
    (store_dir / "block-000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="block-000"):
        ShardStore(store_dir).block_tensors(0)


def test_verified_file_is_not_hashed_again(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ShardStore(store_dir).verify_all()
    reloaded = ShardStore(store_dir)  # hashes manifest.json itself, before the patch

    def no_hashing(*_args: object) -> None:
        raise AssertionError("re-hashed a verified file")

    monkeypatch.setattr(shard.hashlib, "sha256", no_hashing)
    monkeypatch.setattr(shard.hashlib, "file_digest", no_hashing)
    assert reloaded.block_tensors(3) and reloaded.entry_tensors()
    assert reloaded.tokenizer_path.is_file()
    monkeypatch.undo()
    _flip_bit(store_dir / "block-003.safetensors")  # a changed file is hashed again
    stat = (store_dir / "block-003.safetensors").stat()
    os.utime(store_dir / "block-003.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(ShardVerificationError, match="block-003"):
        ShardStore(store_dir).block_tensors(3)


def test_pickle_files_are_refused_and_never_unpickled(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sentinel = tmp_path / "unpickled"
    monkeypatch.setenv(_SENTINEL_ENV, str(sentinel))
    payload = pickle.dumps(_Booby())
    for suffix in (".bin", ".pt"):
        (store_dir / f"block-000{suffix}").write_bytes(payload)
        manifest = json.loads((store_dir / "manifest.json").read_text())
        digest = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        old = manifest["blocks"][0]["file"]
        manifest["files"].pop(old, None)
        manifest["files"][f"block-000{suffix}"] = digest
        manifest["blocks"][0].update(file=f"block-000{suffix}", **digest)
        (store_dir / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(UnsafeCheckpointError, match=f"block-000\\{suffix}"):
            ShardStore(store_dir)
    # A checkpoint folder with only pickle weights is refused by `shard` too.
    pickled_model = tmp_path / "pickled"
    pickled_model.mkdir()
    (pickled_model / "config.json").write_text(json.dumps(manifest["config"]))
    (pickled_model / "tokenizer.json").write_bytes((store_dir / "tokenizer.json").read_bytes())
    (pickled_model / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        write_shards(pickled_model, tmp_path / "never")
    assert not sentinel.exists()
    assert not (tmp_path / "never").exists()


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(manifest: dict[str, Any]) -> None:
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: m.pop("num_blocks"), "num_blocks"),
        (_set(["format_version"], 99), "format_version"),
        (_set(["blocks", 1, "index"], 7), "blocks.1.index"),
        (_set(["blocks", 1, "sha256"], "00" * 32), "blocks.1.file"),
        (_set(["blocks", 2, "file"], "../../etc/passwd"), "blocks.2.file"),
        (_set(["blocks", 0, "bytes"], -1), "blocks.0.bytes"),
        (_set(["files", "entry.safetensors", "sha256"], "not-hex"), "files.entry.safetensors.sha256"),
        (_set(["entry", "file"], "other.safetensors"), "entry.file"),
        (_set(["config", "num_hidden_layers"], 5), "num_blocks"),
        (_set(["surprise"], 1), "surprise"),
        (_set(["architecture"], "gpt2"), "architecture"),
        (_set(["config", "hidden_size"], -4), "config"),
        (_set(["head_flops_per_token"], float("inf")), "head_flops_per_token"),
        (_set(["blocks", 1, "flops_per_token"], float("nan")), "blocks.1.flops_per_token"),
    ],
)
def test_bad_manifest_fields_are_named(store_dir: Path, mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    manifest = json.loads((store_dir / "manifest.json").read_text())
    mutate(manifest)
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"field {field}"):
        ShardStore(store_dir)


def test_unparsable_or_missing_manifest(store_dir: Path, tmp_path: Path) -> None:
    (store_dir / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json"):
        ShardStore(store_dir)
    with pytest.raises(CheckpointError, match="cannot read the shard manifest"):
        ShardStore(tmp_path / "nowhere")


def test_expected_manifest_digest(store_dir: Path) -> None:
    digest = hashlib.sha256((store_dir / "manifest.json").read_bytes()).hexdigest()
    assert ShardStore(store_dir, expected_manifest_sha256=digest).manifest_sha256 == digest
    with pytest.raises(ShardVerificationError, match="manifest.json"):
        ShardStore(store_dir, expected_manifest_sha256="0" * 64)


def test_rewrite_replaces_a_store_but_not_a_foreign_folder(tiny_llama: Path, store_dir: Path, tmp_path: Path) -> None:
    write_shards(tiny_llama, store_dir, model_name="again")
    assert ShardStore(store_dir).manifest.model_name == "again"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a shard store"):
        write_shards(tiny_llama, foreign)
    assert (foreign / "notes.txt").read_text() == "keep"


def test_split_inference_from_shards_equals_checkpoint(tiny_llama: Path, store_dir: Path) -> None:
    prompt = [5, 17, 42, 99, 3]
    reference = LocalPipeline(tiny_llama)
    split = LocalPipeline(ShardStore(store_dir), splits=(1, 3))
    assert split.generate(prompt, 8, stop_at_eos=False).token_ids == reference.generate(
        prompt, 8, stop_at_eos=False).token_ids
    torch.testing.assert_close(split.logits(prompt), reference.logits(prompt), atol=1e-5, rtol=0)


def test_split_embeddings_from_shards_equal_checkpoint(tmp_path: Path) -> None:
    model_dir = write_tiny_checkpoint("bert", tmp_path / "bert", layers=4, seed=2)
    write_shards(model_dir, tmp_path / "store")
    ids = [2, 40, 41, 57, 3]
    reference = LocalPipeline(model_dir).embed(ids)
    split = LocalPipeline(ShardStore(tmp_path / "store"), splits=(2,)).embed(ids)
    assert max(abs(a - b) for a, b in zip(split, reference, strict=True)) < 1e-5


def test_cli_tiny_and_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    model_dir = tmp_path / "tiny"
    assert main(["models", "tiny", "gpt2", "--out", str(model_dir), "--layers", "2", "--seed", "4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(model_dir)
    assert main(["shard", str(model_dir), "--out", str(tmp_path / "store")]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(tmp_path / "store" / "manifest.json")
    assert "block 2/2" in captured.err
    assert ShardStore(tmp_path / "store").manifest.num_blocks == 2
    assert main(["shard", str(tmp_path / "missing"), "--out", str(tmp_path / "other")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("edgesplit: ") and error.count("\n") == 1 and "missing" in error


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_weights_that_are_not_finite_are_refused_naming_file_and_tensor(tmp_path: Path, bad: float) -> None:
    """A checkpoint whose block 2 holds one NaN/Inf weight: its store is written with
    matching digests (so only the value check can catch it), and loading block 2 from
    the store or the checkpoint is refused; the other blocks still load."""
    from safetensors.torch import load_file, save_file

    model_dir = write_tiny_checkpoint("llama", tmp_path / "ckpt", layers=4, seed=3)
    weights = load_file(str(model_dir / "model.safetensors"))
    name = "model.layers.2.self_attn.k_proj.weight"
    weights[name] = weights[name].clone()
    weights[name].view(-1)[5] = bad
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    write_shards(model_dir, tmp_path / "store")
    store = ShardStore(tmp_path / "store")
    with pytest.raises(CheckpointError) as caught:
        store.block_tensors(2)
    message = str(caught.value)
    assert "block-002.safetensors" in message and repr(name) in message
    assert "1 NaN or infinite values (first at flat index 5)" in message
    assert store.block_tensors(1) and store.block_tensors(3) and store.entry_tensors()
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor {name!r} holds 1 NaN"):
        Checkpoint(model_dir).block_tensors(2)
    with pytest.raises(CheckpointError, match="block-002.safetensors"):
        LocalPipeline(store)
