"""Malformed shard files are refused with an error that names the file and the problem:
a truncated file, a flipped byte, a repeated tensor name, NaN weights, a pickle renamed
.safetensors, and a manifest from another model. Each case is tried twice where it
matters: with the manifest as written (the digests catch it) and with a manifest that
was rewritten to match the bad file (as a careless tool or an attacker would), so only
the content checks can catch it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save

from shared.errors import CheckpointError, ShardVerificationError, UnsafeCheckpointError
from shared.model.checkpoint import Checkpoint
from shared.model.shard import ShardStore, forget_verified, write_shards
from shared.model.tiny import write_tiny_checkpoint

_SENTINEL_ENV = "EDGESPLIT_TEST_UNPICKLED_MALFORMED"


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
    return write_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), layers=2, seed=3)


@pytest.fixture
def store(tiny_llama: Path, tmp_path: Path) -> Path:
    return write_shards(tiny_llama, tmp_path / "store").parent


def _replace(store: Path, name: str, content: bytes, *, tensor_names: list[str] | None = None) -> None:
    """Write ``content`` as the store's file ``name`` and rewrite manifest.json to match
    it (size, digest and, if given, the tensor list), so the digests cannot catch it."""
    (store / name).write_bytes(content)
    manifest = json.loads((store / "manifest.json").read_text())
    digest = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    manifest["files"][name] = digest
    for block in manifest["blocks"]:
        if block["file"] == name:
            block.update(digest)
            if tensor_names is not None:
                block["tensor_names"] = tensor_names
    (store / "manifest.json").write_text(json.dumps(manifest))


def _raw_safetensors(entries: list[tuple[str, torch.Tensor, int]], data: bytes) -> bytes:
    """A safetensors file written by hand: header entries (name, tensor, byte offset)
    in this order, repeats allowed, followed by ``data``."""
    items = [
        f'"{name}":{{"dtype":"F32","shape":{list(tensor.shape)},'
        f'"data_offsets":[{offset},{offset + tensor.numel() * 4}]}}'
        for name, tensor, offset in entries
    ]
    header = ("{" + ",".join(items) + "}").encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


# --- truncated ----------------------------------------------------------------------------


def test_a_truncated_shard_file_is_refused_naming_it(store: Path) -> None:
    path = store / "block-001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardVerificationError, match=r"block-001\.safetensors: \d+ bytes, the manifest says"):
        ShardStore(store).block_tensors(1)
    _replace(store, "block-001.safetensors", data[: len(data) // 2])  # the digests now agree
    with pytest.raises(CheckpointError, match=r"block-001\.safetensors: not a valid safetensors file, truncated"):
        ShardStore(store).block_tensors(1)
    _replace(store, "block-001.safetensors", data[:100])  # inside the header
    with pytest.raises(CheckpointError, match=r"block-001\.safetensors: truncated: 100 bytes, but its header"):
        ShardStore(store).block_tensors(1)
    assert set(ShardStore(store).block_tensors(0))  # the other block still loads


def test_a_truncated_checkpoint_is_refused_naming_it(tiny_llama: Path, tmp_path: Path) -> None:
    model = write_tiny_checkpoint("llama", tmp_path / "model", layers=2, seed=3)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: 5 bytes"):
        Checkpoint(model)


# --- a flipped byte -----------------------------------------------------------------------


def test_a_flipped_byte_fails_the_digest_naming_the_file(store: Path) -> None:
    path = store / "entry.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardVerificationError, match=r"entry\.safetensors: sha256 [0-9a-f]{64} does not match the manifest's"):
        ShardStore(store).entry_tensors()
    with pytest.raises(ShardVerificationError, match=r"entry\.safetensors"):
        ShardStore(store).verify_all()


# --- a repeated tensor name ---------------------------------------------------------------


def test_a_tensor_name_repeated_in_a_file_header_is_refused(store: Path) -> None:
    """safetensors itself keeps the last of two header entries with one name."""
    tensors = load_file(str(store / "block-000.safetensors"))
    name = sorted(tensors)[0]
    first = tensors[name].flatten()
    others = [(n, t) for n, t in sorted(tensors.items()) if n != name]
    data, entries, offset = [first.numpy().tobytes()], [(name, first, 0), (name, first, 0)], first.numel() * 4
    for other, tensor in others:
        entries.append((other, tensor.flatten(), offset))
        data.append(tensor.flatten().numpy().tobytes())
        offset += tensor.numel() * 4
    _replace(store, "block-000.safetensors", _raw_safetensors(entries, b"".join(data)))
    with pytest.raises(CheckpointError, match=rf"block-000\.safetensors: tensor '{name}' appears twice in the header"):
        ShardStore(store).block_tensors(0)


def test_one_tensor_under_two_names_in_a_block_file_is_refused(store: Path) -> None:
    tensors = load_file(str(store / "block-001.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors["layers.1.mlp.up_proj.weight"] = tensors[name].clone()  # the same tensor, unprefixed
    _replace(store, "block-001.safetensors", save(tensors), tensor_names=sorted(tensors))
    with pytest.raises(CheckpointError, match=r"block-001\.safetensors: tensor 'mlp\.up_proj\.weight' of block 1 appears twice"):
        ShardStore(store).block_tensors(1)


def test_a_tensor_listed_twice_in_the_manifest_is_refused(store: Path) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["blocks"][1]["tensor_names"].append(manifest["blocks"][0]["tensor_names"][0])
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"field blocks\.1\.tensor_names: tensor 'model\.layers\.0\..*' is also listed in blocks\.0"):
        ShardStore(store)
    manifest["blocks"][1]["tensor_names"][-1] = "model.layers.0.extra.weight"  # not block 1's
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"field blocks\.1\.tensor_names: tensor 'model\.layers\.0\.extra\.weight' is in block 0"):
        ShardStore(store)


def test_a_tensor_name_repeated_in_a_checkpoint_header_is_refused(tmp_path: Path) -> None:
    model = write_tiny_checkpoint("gpt2", tmp_path / "model", layers=1, seed=1)
    tensors = load_file(str(model / "model.safetensors"))
    name = sorted(tensors)[-1]
    entries, data, offset = [], [], 0
    for other, tensor in sorted(tensors.items()):
        entries.append((other, tensor.flatten(), offset))
        data.append(tensor.flatten().numpy().tobytes())
        offset += tensor.numel() * 4
    entries.append((name, tensors[name].flatten(), entries[-1][2]))
    (model / "model.safetensors").write_bytes(_raw_safetensors(entries, b"".join(data)))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' appears twice in the header"):
        Checkpoint(model)


# --- NaN weights ----------------------------------------------------------------------------


def test_nan_weights_are_refused_naming_file_and_tensor(store: Path) -> None:
    tensors = load_file(str(store / "block-001.safetensors"))
    name = "model.layers.1.self_attn.v_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3, 5] = float("nan")
    _replace(store, "block-001.safetensors", save(tensors))
    with pytest.raises(CheckpointError, match=rf"block-001\.safetensors: tensor '{name}' holds 1 NaN or infinite values"):
        ShardStore(store).block_tensors(1)
    assert set(ShardStore(store).block_tensors(0))


# --- a pickle renamed .safetensors ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_a_pickle_renamed_safetensors_is_refused_and_never_unpickled(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    sentinel = tmp_path / "unpickled"
    monkeypatch.setenv(_SENTINEL_ENV, str(sentinel))
    if kind == "pickle":
        payload = pickle.dumps(_Booby(), protocol=4)
    else:
        buffer = io.BytesIO()
        torch.save({"w": torch.ones(2), "boom": _Booby()}, buffer)
        payload = buffer.getvalue()
    _replace(store, "block-000.safetensors", payload)  # digests match: only the content is wrong
    with pytest.raises(UnsafeCheckpointError, match=r"block-000\.safetensors: is a pickle .*named \.safetensors"):
        ShardStore(store).block_tensors(0)
    model = write_tiny_checkpoint("gpt2", tmp_path / "model", layers=1, seed=1)
    (model / "model.safetensors").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=r"model\.safetensors: is a pickle"):
        Checkpoint(model)
    with pytest.raises(UnsafeCheckpointError, match=r"model\.safetensors: is a pickle"):
        write_shards(model, tmp_path / "never")
    assert not sentinel.exists()


# --- a manifest from another model ---------------------------------------------------------


def test_a_manifest_from_another_model_is_refused(store: Path, tmp_path: Path) -> None:
    own = hashlib.sha256((store / "manifest.json").read_bytes()).hexdigest()
    gpt2 = write_tiny_checkpoint("gpt2", tmp_path / "gpt2", layers=2, seed=1)
    other = write_shards(gpt2, tmp_path / "gpt2-store").read_bytes()
    (store / "manifest.json").write_bytes(other)
    with pytest.raises(ShardVerificationError, match=rf"manifest\.json: sha256 [0-9a-f]{{64}} does not match the expected {own}"):
        ShardStore(store, expected_manifest_sha256=own)  # pinned: refused on opening
    unpinned = ShardStore(store)  # a valid manifest, but none of its files are these
    assert unpinned.manifest.architecture == "gpt2"
    with pytest.raises(ShardVerificationError, match=r"block-000\.safetensors: .*the manifest"):
        unpinned.block_tensors(0)
    with pytest.raises(ShardVerificationError, match=r"the manifest"):
        unpinned.verify_all()
