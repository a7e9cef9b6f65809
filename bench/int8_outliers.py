"""Cost of the int8 outlier decomposition, side by side in one process, one thread.

Three variants of each SmolLM2 linear shape ``[out, in]`` (576x576 q/o, 192x576 k/v,
1536x576 gate/up, 576x1536 down), called on one row (decode) and on eight rows,
interleaved call by call so machine noise falls on all alike:

- ``fp32``: ``F.linear`` with the fp32 weight;
- ``old``: ``Int8Linear.__call__`` as it was before the decomposition (main at
  815ca60, kept here as ``OldInt8Call``: smoothed, every row rescaled, no outlier
  channels, ``reduce_range`` on);
- ``new``: ``Int8Linear`` as shipped: ``in / 32`` outlier channels (the most this
  model's calibration picks), the block Hadamard rotation of its inputs, and
  ``reduce_range`` as this CPU allows (off with VNNI).

Then one whole decode step: SmolLM2 loaded three times (fp32; int8 without outlier
channels, every linear and the head run by ``OldInt8Call``; int8 as shipped), the same greedy generation alternated between
them (bench/local.py ``measure``), median time per output token. Prints medians (us or
ms) and each variant's ratio to fp32 and new / old.

    .venv/bin/python -m bench.int8_outliers [--calls 400] [--tokens 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.local import PROMPT, measure, resolve_model
from bench.quant_speed import unfused_int8
from shared.model import quant, quant_kernels
from shared.model.pipeline import LocalPipeline

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))
Variant = tuple[Callable[[torch.Tensor], torch.Tensor], bool]  # (call, reduce_range)


class OldInt8Call:
    """``Int8Linear.__call__`` of main at 815ca60, over an outlier-free ``Int8Linear``."""

    def __init__(self, kernel: quant_kernels.Int8Linear) -> None:
        self.packed, self.inverse_smooth = kernel._packed, kernel._inverse_smooth  # noqa: SLF001
        self.shape, self.nbytes = kernel.shape, kernel.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.inverse_smooth is not None:
            x = x * self.inverse_smooth
        row_scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)
        y = torch.ops.quantized.linear_dynamic((x / row_scale).contiguous(), self.packed, True)
        return y * row_scale  # type: ignore[no-any-return]


def kernel_variants(out_features: int, in_features: int) -> dict[str, Variant]:
    """fp32 / old / new callables for one random ``[out, in]`` weight whose inputs have
    ``in / 32`` massive channels."""
    generator = torch.Generator().manual_seed(out_features * 7 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    amax = torch.rand(in_features, generator=generator) + 0.5
    amax[torch.randperm(in_features, generator=generator)[: in_features // 32]] = 50.0
    smoothed, extra = quant.calibrated(weight, amax)
    plain = weight * extra[quant.SMOOTH_SUFFIX]
    old = quant_kernels.Int8Linear(*quant.quantise_int8(plain), None, extra[quant.SMOOTH_SUFFIX])
    new = quant_kernels.Int8Linear(*quant.quantise_int8(smoothed), None, extra[quant.SMOOTH_SUFFIX],
                           (extra[quant.OUTLIER_SUFFIX], extra[quant.OUTLIER_WEIGHT_SUFFIX]),
                           quant.ROTATION_SUFFIX in extra)  # fmt: skip
    return {
        "fp32": (lambda x: F.linear(x, weight), quant_kernels.REDUCE_RANGE),
        "old": (OldInt8Call(old), True),
        "new": (new, quant_kernels.REDUCE_RANGE),
    }


def time_kernels(variants: dict[str, Variant], x: torch.Tensor, calls: int) -> dict[str, float]:
    """Median seconds per call of each variant, calls interleaved."""
    default = quant_kernels.REDUCE_RANGE
    samples: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(calls):
            for name, (call, reduce_range) in variants.items():
                quant_kernels.REDUCE_RANGE = reduce_range  # read by Int8Linear at call time
                start = time.perf_counter()
                call(x)
                samples[name].append(time.perf_counter() - start)
    finally:
        quant_kernels.REDUCE_RANGE = default
    return {name: statistics.median(values) for name, values in samples.items()}


def decode_step(tokens: int, repeats: int) -> dict[str, float]:
    """Median TPOT (s) of SmolLM2 at fp32, old int8 and new int8, alternated."""
    model = resolve_model("smollm2")
    ratio, block = quant.OUTLIER_RATIO, quant.ROTATION_BLOCK
    quant.OUTLIER_RATIO, quant.ROTATION_BLOCK = float("inf"), 10**9  # the old form: no
    try:  # channel qualifies as an outlier, no width is a multiple of the block; and a
        old = unfused_int8(model)  # kernel per linear, as then (bench/quant_speed.py)
    finally:
        quant.OUTLIER_RATIO, quant.ROTATION_BLOCK = ratio, block
    for segment in old.segments:
        for _, linears in segment.linear_layers():
            for name, weight in list(linears.items()):
                assert isinstance(weight, quant_kernels.Int8Linear)
                linears[name] = OldInt8Call(weight)
    assert isinstance(old.entry.head, quant_kernels.Int8Linear)
    old.entry.head = OldInt8Call(old.entry.head)
    variants = {"fp32": LocalPipeline(model), "old": old, "new": LocalPipeline(model, weights="int8")}
    prompt_ids = variants["fp32"].tokenizer.encode(PROMPT)
    runs = measure(variants, prompt_ids, tokens, repeats)
    return {name: statistics.median(r.tpot_s for r in results) for name, results in runs.items()}


def report(label: str, medians: dict[str, float], unit: float, unit_name: str) -> None:
    fp32, old, new = medians["fp32"], medians["old"], medians["new"]
    print(f"{label:22} fp32 {fp32 / unit:9.1f} {unit_name}  old {old / unit:9.1f}  new {new / unit:9.1f}"
          f"   old/fp32 {old / fp32:5.2f}  new/fp32 {new / fp32:5.2f}  new/old {new / old:5.2f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="interleaved calls per shape")
    parser.add_argument("--tokens", type=int, default=16, help="decode: new tokens per run")
    parser.add_argument("--repeats", type=int, default=5, help="decode: runs per variant (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"1 thread, reduce_range for new: {quant_kernels.REDUCE_RANGE}, median of {args.calls} calls")
    for out_features, in_features in SHAPES:
        variants = kernel_variants(out_features, in_features)
        for rows in (1, 8):
            x = torch.randn(rows, in_features)
            time_kernels(variants, x, 20)  # warm-up
            medians = time_kernels(variants, x, args.calls)
            report(f"{out_features}x{in_features}, {rows} row(s)", medians, 1e-6, "us")
    if args.repeats:
        medians = decode_step(args.tokens, args.repeats)
        report(f"decode step ({args.tokens} tok)", medians, 1e-3, "ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
