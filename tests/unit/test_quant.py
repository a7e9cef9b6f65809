"""Quantised linear weights (shared/model/quant.py): the stored forms, the load-time
transform, quantised shard stores, their malformed variants, and the CLI options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.cli import main
from shared.errors import CheckpointError, ConfigError
from shared.model import quant
from shared.model.pipeline import LocalPipeline
from shared.model.quant import (
    INT4_GROUP_SIZE,
    MAX_OUTLIER_SHARE,
    OUTLIER_SUFFIX,
    OUTLIER_WEIGHT_SUFFIX,
    ROTATION_SUFFIX,
    SMOOTH_SUFFIX,
    calibrated,
    dequantise_int4,
    outlier_channels,
    quantise_int4,
    quantise_int8,
    smoothing,
)
from shared.model.quant_kernels import ROTATION_BLOCK, Int8Linear, rotated
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
        # outlier channels and the rotation (shared/model/quant.py)
        ({"model.layers.1.mlp.up_proj.weight_outliers": torch.tensor([3, 1]),
          "model.layers.1.mlp.up_proj.weight_outlier_weight": torch.ones(128, 2)}, "ascending"),
        ({"model.layers.1.mlp.up_proj.weight_outliers": torch.tensor([64]),
          "model.layers.1.mlp.up_proj.weight_outlier_weight": torch.ones(128, 1)}, "ascending"),
        ({"model.layers.1.mlp.up_proj.weight_outliers": torch.tensor([1, 2])}, "together"),
        ({"model.layers.1.mlp.up_proj.weight_rotation": torch.tensor([32])}, "rotation"),
        ({"model.layers.1.mlp.up_proj.weight_outliers": torch.tensor([1, 2]),
          "model.layers.1.mlp.up_proj.weight_outlier_weight": torch.ones(128, 3)}, "fp32 \\[128, 2\\]"),
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


def _massive_channel_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight [64, 128], inputs [4, 128] with two channels 60-100x the rest, x W^T)."""
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 128, generator=generator)
    x = torch.randn(4, 128, generator=generator)
    x[:, 5] *= 100.0
    x[:, 77] *= 60.0
    return weight, x, x @ weight.T


def test_outlier_decomposition_tracks_fp32_where_smoothing_alone_does_not() -> None:
    weight, x, expected = _massive_channel_case()
    input_amax = x.abs().amax(dim=0)
    smoothed, extra = calibrated(weight, input_amax)
    channels, columns = extra[OUTLIER_SUFFIX], extra[OUTLIER_WEIGHT_SUFFIX]
    assert channels.tolist() == [5, 77] and torch.equal(columns, weight[:, [5, 77]])
    assert extra[ROTATION_SUFFIX].tolist() == [ROTATION_BLOCK]  # 128 inputs: two blocks of 64
    unrotated = rotated(smoothed)  # the rotation is its own inverse
    assert float(unrotated[:, [5, 77]].abs().max()) < 1e-5 and bool((extra[SMOOTH_SUFFIX][[5, 77]] == 1).all())
    new = Int8Linear(*quantise_int8(smoothed), None, extra[SMOOTH_SUFFIX], (channels, columns), True)
    factors = smoothing(weight, input_amax)
    old = Int8Linear(*quantise_int8(weight * factors), None, factors)  # smoothed, no outliers
    scale = float(expected.abs().max())
    for rows in (4, 1):  # a prompt and a decode step
        new_error = float((new(x[:rows]) - expected[:rows]).abs().max()) / scale
        old_error = float((old(x[:rows]) - expected[:rows]).abs().max()) / scale
        assert new_error < 0.0015 < old_error, (rows, new_error, old_error)


def test_no_channel_is_an_outlier_below_the_ratio_or_beyond_the_share() -> None:
    flat = torch.ones(128)
    assert outlier_channels(flat).numel() == 0
    spiky = flat.clone()
    spiky[torch.arange(0, 128, 8)] = 50.0  # 16 spikes; at most 128 / 32 = 4 are taken
    spiky[40] = 80.0
    chosen = outlier_channels(spiky)
    assert chosen.numel() == int(128 * MAX_OUTLIER_SHARE) and 40 in chosen.tolist()
    assert bool((chosen[1:] > chosen[:-1]).all())


def test_massive_channel_runs_in_fp32_and_stores_without_outliers_still_load(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A llama whose block-1 norm makes one input channel of q/k/v massive: the int8 store
    keeps that channel in fp32 (and rotates), so q/k/v on such inputs track fp32 several
    times closer than a store written as before either existed (smoothing only), which
    still loads and runs. (Per linear, on the block's own kind of input: the logits of a
    tiny random model amplify single rounding flips, so they cannot rank the two.)"""
    checkpoint = tmp_path / "massive"
    shutil.copytree(tiny["llama"], checkpoint)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tensors["model.layers.1.input_layernorm.weight"][3] = 200.0
    save_file(tensors, str(checkpoint / "model.safetensors"))
    write_shards(checkpoint, tmp_path / "store", weights="int8")
    names = ShardStore(tmp_path / "store").manifest.blocks[1].tensor_names
    assert {f"model.layers.1.self_attn.q_proj.weight{s}" for s in ("_outliers", "_rotation")} <= set(names)
    with monkeypatch.context() as patch:  # write the old form: no outlier channel, no rotation
        patch.setattr(quant, "OUTLIER_RATIO", float("inf"))
        patch.setattr(quant, "ROTATION_BLOCK", 10**9)
        write_shards(checkpoint, tmp_path / "old", weights="int8")
    old_store = ShardStore(tmp_path / "old")
    old_names = {n for b in old_store.manifest.blocks for n in b.tensor_names}
    assert not any("_outlier" in n or "_rotation" in n for n in old_names)
    assert any(n.endswith("_smooth") for n in old_names)
    old_form = LocalPipeline(old_store)
    new_form = LocalPipeline(ShardStore(tmp_path / "store"))
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    x[:, 3] *= 200.0  # what the norm does to the block's input
    for name in ("q_proj", "k_proj", "v_proj"):
        weight = tensors[f"model.layers.1.self_attn.{name}.weight"]
        exact = x @ weight.T

        def error(pipeline: LocalPipeline, name: str = name, exact: torch.Tensor = exact) -> float:
            kernel = dict(pipeline.segments[0].linear_layers())[1][f"self_attn.{name}.weight"]
            return float((kernel(x) - exact).norm() / exact.norm())

        assert error(new_form) < 0.3 * error(old_form), name
    assert old_form.generate(PROMPT, 4).token_ids  # runs as before


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_loaded_int8_blocks_keep_no_shard_file_mapped(tiny: dict[str, Path], tmp_path: Path) -> None:
    """safetensors' load_file maps the whole file and every tensor it returns keeps the
    mapping: a quantised block must keep none of them, or its file stays resident beside
    the packed weights (SmolLM2: 120 MB of 30 int8 blocks)."""
    checkpoint = tmp_path / "massive"
    shutil.copytree(tiny["llama"], checkpoint)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tensors["model.layers.1.input_layernorm.weight"][3] = 200.0  # one-column outliers too
    save_file(tensors, str(checkpoint / "model.safetensors"))
    write_shards(checkpoint, tmp_path / "store", weights="int8")
    store = ShardStore(tmp_path / "store")
    store.verify_all()  # verified files are read back with load_file (mapped)
    pipeline = LocalPipeline(store)
    block_files = [b.file for b in store.manifest.blocks]
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines()
              if str(tmp_path / "store") in line and any(f in line for f in block_files)]  # fmt: skip
    assert mapped == []
    assert pipeline.generate(PROMPT, 2).token_ids


def test_rotation_is_orthonormal_and_an_int8_kernel_with_it_matches_the_product() -> None:
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(rotated(rotated(x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotated(x).norm(dim=1), x.norm(dim=1))
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    got = Int8Linear(*quantise_int8(rotated(weight)), None, None, None, True)(x)
    expected = x @ weight.T
    assert float((got - expected).abs().max()) < 0.02 * float(expected.abs().max())
