"""Linears that read one input run as one int8 kernel (shared/model/quant_fusion.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.model import quant
from shared.model.layers import linear_group
from shared.model.pipeline import LocalPipeline
from shared.model.quant import calibrated, quantise_int8
from shared.model.quant_fusion import FusedPart, Int8Spec, build_kernels, joint_weight_amax
from shared.model.quant_kernels import Int8Linear
from shared.model.shard import ShardStore, forget_verified, write_shards
from shared.model.tiny import write_tiny_checkpoint

PROMPT = [5, 17, 42, 9, 3, 77]
GROUP = ("q", "k", "v")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fusion")
    return {arch: write_tiny_checkpoint(arch, root / arch, layers=3, seed=5) for arch in ("llama", "bert")}


def _calibrated_specs(joint: bool) -> tuple[dict[str, Int8Spec], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(rows, 128, generator=generator)
               for name, rows in zip(GROUP, (128, 32, 32), strict=True)}  # fmt: skip
    input_amax = torch.rand(128, generator=generator) + 0.5
    input_amax[[7, 90]] = 60.0  # two outlier channels
    shared = joint_weight_amax(weights, [GROUP]) if joint else {}
    specs = {}
    for name, weight in weights.items():
        smoothed, extra = calibrated(weight, input_amax, shared.get(name))
        specs[name] = Int8Spec(*quantise_int8(smoothed), tuple(weight.shape), extra[quant.SMOOTH_SUFFIX],
                               (extra[quant.OUTLIER_SUFFIX], extra[quant.OUTLIER_WEIGHT_SUFFIX]), True)  # fmt: skip
    return specs, weights


@pytest.mark.parametrize("rows", [1, 5])
def test_a_fused_kernel_gives_each_linear_its_own_output(rows: int) -> None:
    """One call over the stacked q/k/v equals the three calls (the same input
    quantisation, the rows of x W^T do not mix), alone or through ``linear_group``, with
    biases; the kernel holds the shared input transform once."""
    specs, weights = _calibrated_specs(joint=True)
    fused = build_kernels(specs, [GROUP])
    alone = build_kernels(specs, [])
    assert all(isinstance(fused[n], FusedPart) for n in GROUP)
    assert all(isinstance(alone[n], Int8Linear) for n in GROUP)
    assert len({id(part.kernel) for part in fused.values() if isinstance(part, FusedPart)}) == 1
    transform = 128 * 4 + 2 * 8  # the inverse smoothing factors and outlier indices, held once
    assert sum(w.nbytes for w in fused.values()) == sum(w.nbytes for w in alone.values()) - 2 * transform
    assert [tuple(fused[n].shape) for n in GROUP] == [(128, 128), (32, 128), (32, 128)]
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(3))
    x[:, 7] *= 40.0
    biases = [torch.randn(w.shape[0]) for w in weights.values()]
    grouped = linear_group(x, [fused[n] for n in GROUP], biases)
    for name, bias, got in zip(GROUP, biases, grouped, strict=True):
        expected = alone[name](x)
        assert torch.allclose(fused[name](x), expected, rtol=0, atol=1e-5), name
        assert torch.allclose(got, expected + bias, rtol=0, atol=1e-5), name
        exact = x @ weights[name].T
        assert float((expected - exact).norm() / exact.norm()) < 0.02, name


def test_linears_with_their_own_transforms_stay_apart() -> None:
    """A factor per linear (stores written before fusion) cannot share one input
    transform: each keeps its kernel. A group missing a member is not fused either."""
    specs, _ = _calibrated_specs(joint=False)
    kernels = build_kernels(specs, [GROUP])
    assert all(isinstance(kernels[n], Int8Linear) for n in GROUP)
    joint, _ = _calibrated_specs(joint=True)
    partial = build_kernels({n: joint[n] for n in ("q", "k")}, [GROUP])
    assert all(isinstance(w, Int8Linear) for w in partial.values())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_stores_and_load_time_int8_fuse_the_groups_and_match_unfused(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    """An int8 store smooths each group with one factor, so its q/k/v (and Llama's
    gate/up) load as one kernel; the numbers equal the same store loaded unfused."""
    write_shards(tiny[arch], tmp_path / "store", weights="int8")
    block = load_file(str(tmp_path / "store" / "block-001.safetensors"))
    prefix = "model.layers.1.self_attn" if arch == "llama" else "encoder.layer.1.attention.self"
    names = ("q_proj", "k_proj", "v_proj") if arch == "llama" else ("query", "key", "value")
    factors = [block[f"{prefix}.{n}.weight_smooth"] for n in names]
    assert all(torch.equal(f, factors[0]) for f in factors)
    fused = LocalPipeline(ShardStore(tmp_path / "store"))
    linears = dict(fused.segments[0].linear_layers())[1]
    kernels = {id(w.kernel) for w in linears.values() if isinstance(w, FusedPart)}
    assert len(kernels) == (2 if arch == "llama" else 1)
    family = quant_family(arch)
    monkeypatch.setattr(family, "fused_linears", lambda config: ())
    unfused = LocalPipeline(ShardStore(tmp_path / "store"))
    assert not any(isinstance(w, FusedPart) for w in dict(unfused.segments[0].linear_layers())[1].values())
    assert fused.segments[0].weight_bytes < unfused.segments[0].weight_bytes  # transforms held once
    if arch == "bert":
        a, b = (torch.tensor(p.embed(PROMPT)) for p in (fused, unfused))
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
    else:
        assert torch.allclose(fused.logits(PROMPT), unfused.logits(PROMPT), rtol=0, atol=1e-4)
        assert fused.generate(PROMPT, 8).token_ids == unfused.generate(PROMPT, 8).token_ids


def test_quantising_at_load_fuses_the_groups_too(tiny: dict[str, Path]) -> None:
    """``--weights int8`` on an fp32 checkpoint calibrates at load with the groups' joint
    ranges, so its groups share kernels as a store's do."""
    pipeline = LocalPipeline(tiny["llama"], weights="int8")
    for _, linears in pipeline.segments[0].linear_layers():
        parts = {n: w for n, w in linears.items() if isinstance(w, FusedPart)}
        assert set(parts) == {f"self_attn.{n}_proj.weight" for n in "qkv"} | {"mlp.gate_proj.weight", "mlp.up_proj.weight"}
        assert len({id(w.kernel) for w in parts.values()}) == 2
    assert pipeline.generate(PROMPT, 4).token_ids


def test_a_store_with_a_factor_per_linear_still_loads_unfused(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A store written before fusion (a smoothing factor per linear) loads and runs, one
    kernel per linear."""
    write_shards(tiny["llama"], tmp_path / "store", weights="int8")
    path = tmp_path / "store" / "block-000.safetensors"
    block = load_file(str(path))
    name = "model.layers.0.self_attn.k_proj.weight_smooth"
    block[name] = block[name] * 1.01  # no longer the group's factor
    save_file(block, str(path))
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    data = path.read_bytes()
    digest = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["files"][path.name] = digest
    manifest["blocks"][0].update(digest)
    (tmp_path / "store" / "manifest.json").write_text(json.dumps(manifest))
    forget_verified()
    store = ShardStore(tmp_path / "store")
    pipeline = LocalPipeline(store)
    layers = dict(pipeline.segments[0].linear_layers())
    assert isinstance(layers[0]["self_attn.k_proj.weight"], Int8Linear)
    assert isinstance(layers[1]["self_attn.k_proj.weight"], FusedPart)
    assert pipeline.generate(PROMPT, 4).token_ids


def quant_family(arch: str) -> object:
    from shared.model.runtime import FAMILIES

    return FAMILIES[arch]
