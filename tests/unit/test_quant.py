"""Quantised linear weights (shared/model/quant.py): the stored forms, the load-time
transform, quantised shard stores, their malformed variants, and the CLI options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.cli import main
from shared.errors import CheckpointError, ConfigError
from shared.model.pipeline import LocalPipeline
from shared.model.quant import (
    INT4_GROUP_SIZE,
    Int8Linear,
    dequantise_int4,
    quantise_int4,
    quantise_int8,
)
from shared.model.shard import ShardStore, forget_verified, write_shards
from shared.model.tiny import write_tiny_checkpoint

PROMPT = [5, 17, 42, 9, 3, 77]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("quant")
    return {arch: write_tiny_checkpoint(arch, root / arch, layers=4, seed=3)
            for arch in ("llama", "gpt2", "bert")}  # fmt: skip


def test_int8_and_int4_round_trips_stay_within_half_a_step() -> None:
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    values, scales = quantise_int8(weight)
    assert values.dtype == torch.int8 and scales.shape == (48,)
    error = (values.float() * scales[:, None] - weight).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-6).all())
    packed, group_scales = quantise_int4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 32)
    assert group_scales.shape == (48, 64 // INT4_GROUP_SIZE)
    restored = dequantise_int4(packed, group_scales)
    steps = group_scales.repeat_interleave(INT4_GROUP_SIZE, dim=1)
    assert bool(((restored - weight).abs() <= steps / 2 + 1e-6).all())
    with pytest.raises(ConfigError, match="group"):
        quantise_int4(torch.randn(4, 40))


def test_int8_kernel_matches_the_dequantised_product() -> None:
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(1))
    values, scales = quantise_int8(weight)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    expected = x @ (values.float() * scales[:, None]).T
    got = Int8Linear(values, scales)(x)
    assert got.shape == (5, 96)
    # activations are quantised per call to 7 bits: about 1 % of the largest output
    assert float((got - expected).abs().max()) < 0.03 * float(expected.abs().max())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_quantised_store_equals_quantising_at_load(
    tiny: dict[str, Path], tmp_path: Path, arch: str, weights: str
) -> None:
    """`shard --weights W` and `--local --weights W` run the same numbers; the weights
    held shrink (int8 and int4: at most 0.35 x fp32), and the output moves a little."""
    write_shards(tiny[arch], tmp_path / "store", weights=weights)
    store = ShardStore(tmp_path / "store")
    assert (store.manifest.weights, store.manifest.weight_group_size) == (
        weights, INT4_GROUP_SIZE if weights == "int4" else 0)  # fmt: skip
    quantised = weights in ("int8", "int4")
    smoothed = [n for b in store.manifest.blocks for n in b.tensor_names if n.endswith("_smooth")]
    assert bool(smoothed) == quantised  # calibrated SmoothQuant factors beside each weight
    assert (store.manifest.head_input_amax is not None) == (quantised and arch != "bert")
    from_store = LocalPipeline(store, [2])
    at_load = LocalPipeline(tiny[arch], [1, 3], weights=weights)
    fp32 = LocalPipeline(tiny[arch])
    fp32_bytes = sum(segment.weight_bytes for segment in fp32.segments)
    held = sum(segment.weight_bytes for segment in from_store.segments)
    assert held <= (0.55 if weights == "bf16" else 0.35) * fp32_bytes
    if arch == "bert":
        a, b, ref = (torch.tensor(p.embed(PROMPT)) for p in (from_store, at_load, fp32))
        assert torch.equal(a, b) and 0.95 < float(a @ ref) < 1.0
    else:
        a, b, ref = (p.logits(PROMPT) for p in (from_store, at_load, fp32))
        assert torch.equal(a, b) and not torch.equal(a, ref)
        assert from_store.generate(PROMPT, 8).token_ids == at_load.generate(PROMPT, 8).token_ids


def test_old_manifests_read_as_fp32(tiny: dict[str, Path], tmp_path: Path) -> None:
    write_shards(tiny["llama"], tmp_path / "store")
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    for field in ("weights", "weight_group_size"):
        manifest.pop(field)
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    assert ShardStore(tmp_path / "store").weight_precision == "fp32"


def _rewrite_block(store: Path, change: dict[str, torch.Tensor]) -> None:
    """Replace tensors of block 1 and re-sign the manifest so only content checks catch it."""
    import hashlib

    path = store / "block-001.safetensors"
    tensors = load_file(str(path)) | change
    save_file(tensors, str(path))
    data = path.read_bytes()
    manifest = json.loads((store / "manifest.json").read_text())
    digest = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"]["block-001.safetensors"] = digest
    manifest["blocks"][1].update(digest, tensor_names=sorted(tensors))
    (store / "manifest.json").write_text(json.dumps(manifest))
    forget_verified()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model.layers.1.mlp.up_proj.weight_scale": -torch.ones(128)}, "finite positive"),
        ({"model.layers.1.mlp.up_proj.weight_scale": torch.ones(7)}, "expected"),
        ({"model.layers.1.mlp.up_proj.weight": torch.zeros(128, 64, dtype=torch.int16)}, "int16"),
        ({"model.layers.1.input_layernorm.weight": torch.zeros(64, dtype=torch.int8)}, "int8"),
        ({"model.layers.1.mlp.up_proj.weight_smooth": -torch.ones(64)}, "smoothing factors"),
    ],
)
def test_malformed_quantised_block_is_a_typed_error(
    tiny: dict[str, Path], tmp_path: Path, change: dict[str, torch.Tensor], message: str
) -> None:
    write_shards(tiny["llama"], tmp_path / "store", weights="int8")
    _rewrite_block(tmp_path / "store", change)
    with pytest.raises(CheckpointError, match=message):
        LocalPipeline(ShardStore(tmp_path / "store"))


def test_cli_shard_and_local_weights(tiny: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "store"
    assert main(["shard", str(tiny["gpt2"]), "--out", str(out), "--weights", "int8"]) == 0
    assert "int8 weights" in capsys.readouterr().err
    argv = ["generate", "--prompt-ids", "5,17,42", "--max-new-tokens", "6", "--json", "--local",
            "--threads", "1", "--model", str(tiny["gpt2"])]  # fmt: skip
    assert main([*argv, "--weights", "int8"]) == 0
    quantised = json.loads(capsys.readouterr().out)["token_ids"]
    expected = LocalPipeline(ShardStore(out)).generate([5, 17, 42], 6).token_ids
    assert tuple(quantised) == expected
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--weights", "int3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--weights" in err and "Traceback" not in err


def test_planner_counts_held_bytes_per_precision(tiny: dict[str, Path], tmp_path: Path) -> None:
    from shared.planning.live import layers_from_manifest

    held = {}
    for weights in ("fp32", "int8"):
        write_shards(tiny["llama"], tmp_path / weights, weights=weights)
        manifest = ShardStore(tmp_path / weights).manifest
        held[weights] = [layer.weight_bytes for layer in layers_from_manifest(manifest)]
        per_parameter = 4 if weights == "fp32" else 2
        assert held[weights] == [float(max(b.bytes, per_parameter * b.parameters)) for b in manifest.blocks]
    assert sum(held["int8"]) < 0.51 * sum(held["fp32"])
