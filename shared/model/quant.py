"""Quantised linear weights: the stored form, and the kernels they run with.

Quantisation is a transform applied to a model's linear layers when they are loaded;
the model files stay plain (the kernels: shared/model/quant_kernels.py). Each family names its linear weights
(``linear_weights(config)``: name -> True when the checkpoint stores it ``[in, out]``,
GPT-2's Conv1D); everything else (norms, biases, embeddings) stays fp32.

Precisions (``--weights``):

- ``fp32``: as today.
- ``bf16``: weights held in bfloat16, run with a bf16 ``F.linear`` (half the memory).
- ``int8``: symmetric int8 per output channel (scale = max|w| / 127, one fp32 scale per
  row), run with fbgemm's dynamic quantised linear (activations quantised per call, per
  row (``Int8Linear``)). ``reduce_range`` (7-bit activations) only on a CPU without
  AVX-512 VNNI, whose kernels add u8 x s8 pairs in 16 bits and saturate at 8 bits;
  with VNNI (this machine) all 8 bits are used: SmolLM2 perplexity +0.9 % instead of
  +3.0 % (docs/PERFORMANCE.md). ``_weight_int8pack_mm`` was measured 10x slower than fp32 here.
- ``int4``: symmetric int4 in groups of ``INT4_GROUP_SIZE`` input columns (one fp32
  scale per group), two values a byte. No int4 kernel on this CPU beats fp32
  (``_weight_int4pack_mm_for_cpu`` is 16x slower), so at load the int4 values are
  dequantised and re-quantised per output channel to int8 and run with the int8
  kernel: int4 quality at int8 speed and int8 memory; it saves disk and transfer only.

Activations are quantised per row inside the kernel; a few channels of Llama-family
hidden states are 100x larger than the rest, so int8 and int4 weights are smoothed
(SmoothQuant): per input channel the weights are multiplied and the inputs divided by
factors from one fp32 calibration pass (shared/model/calibrate.py), stored as
``NAME_smooth`` [in]. The same pass picks each linear's outlier input channels
(LLM.int8(), Dettmers et al., 2022): max |x_j| above ``OUTLIER_RATIO`` x the median
channel's, at most ``MAX_OUTLIER_SHARE`` of them. Those channels run as a small fp32
product beside the int8 kernel; their int8 weight columns are zero, so neither the
activation row scales nor the weight row scales see them (SmolLM2: 3,285 of 105,984
block input channels plus 18 of the head's 576). Then the smoothed weights and their
inputs are rotated by a block-diagonal Hadamard matrix (``ROTATION_BLOCK``, QuaRot-style),
so each row's 8-bit rounding is spread over its channels (SmolLM2 top-1 agreement with
fp32 96.6 % -> 97.5 %, for 5 % more time per token; docs/PERFORMANCE.md). A worker
quantising an fp32 store at load has no calibration and runs unsmoothed, without
outliers or rotation (lower quality): quantise with ``edgesplit shard --weights``.
Linears that read one input (the family's ``fused_linears``) are smoothed with one
factor per group and run as one kernel (shared/model/quant_fusion.py).

Stored form in a shard file (``edgesplit shard --weights int8|int4``): the tensor keeps
its name and holds the integer values ``[out, in]`` (int8) or ``[out, in / 2]`` (uint8,
low nibble = even column, values + 8); ``NAME_scale`` holds the fp32 scales ``[out]``
(int8) or ``[out, in / group]`` (int4). Always ``[out, in]``, also for GPT-2's Conv1D.
Calibrated stores add ``NAME_smooth`` (fp32 [in], > 0; 1 at outlier channels) and, when
a linear has outlier channels, ``NAME_outliers`` (int64 [k], ascending input channels)
with ``NAME_outlier_weight`` (fp32 [out, k], the unsmoothed columns; the values and
scales then exclude them), and, when the input width is a multiple of
``ROTATION_BLOCK``, ``NAME_rotation`` (int64 [1] = the block size; values and scales are
of the rotated weights). A shard without these tensors (written before them) loads and
runs as then; a loader from before them refuses them (integer tensors without a
``NAME_scale`` of their own). No manifest field changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol, cast

import torch

from shared.errors import CheckpointError, ConfigError
from shared.model.quant_fusion import Int8Spec, build_kernels, joint_weight_amax
from shared.model.quant_kernels import ROTATION_BLOCK as ROTATION_BLOCK  # read at call: patchable
from shared.model.quant_kernels import Bf16Linear, rotated

WeightPrecision = Literal["fp32", "bf16", "int8", "int4"]
PRECISIONS: tuple[WeightPrecision, ...] = ("fp32", "bf16", "int8", "int4")
QUANTISED: tuple[WeightPrecision, ...] = ("int8", "int4")
SCALE_SUFFIX = "_scale"
SMOOTH_SUFFIX = "_smooth"
OUTLIER_SUFFIX = "_outliers"
OUTLIER_WEIGHT_SUFFIX = "_outlier_weight"
ROTATION_SUFFIX = "_rotation"
OUTLIER_RATIO = 3.0
"""An input channel whose calibrated max |x_j| exceeds this many times the median over
the channels runs in fp32 beside the int8 kernel (LLM.int8()-style decomposition)."""
MAX_OUTLIER_SHARE = 1 / 32
"""At most this share of a linear's input channels are outliers (the largest first), so
the fp32 side product stays small."""
SMOOTH_ALPHA = 0.5
"""SmoothQuant (Xiao et al., 2023) migration strength: per input channel j the weights
are multiplied and the activations divided by s_j = max|x_j|^a / max|W_:j|^(1 - a)."""
INT4_GROUP_SIZE = 32
_MIN_SCALE = 1e-12  # an all-zero row gets this scale instead of 0 (no division by zero)


def precision_of(name: str) -> WeightPrecision:
    """The precision called ``name``; ConfigError for anything else."""
    if name not in PRECISIONS:
        raise ConfigError(f"weights precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return cast(WeightPrecision, name)


class PackedLinear(Protocol):
    """What stands in for a linear weight: called on [T, in], gives [T, out]."""

    shape: tuple[int, ...]
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


Weight = torch.Tensor | PackedLinear


# --- quantising fp32 weights --------------------------------------------------------


def quantise_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (int8 values [out, in], fp32 scales [out])."""
    weight = weight.to(torch.float32)
    scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(_MIN_SCALE)
    values = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return values.contiguous(), scales


def quantise_int4(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> (uint8 packed [out, in / 2], fp32 scales [out, in / group]).
    ConfigError when ``in`` is not a multiple of ``group_size`` (itself even)."""
    out_features, in_features = weight.shape
    if group_size < 2 or group_size % 2 or in_features % group_size:
        raise ConfigError(
            f"int4 needs the input width ({in_features}) to be a multiple of an even group "
            f"size ({group_size}); use int8"
        )
    groups = weight.to(torch.float32).reshape(out_features, -1, group_size)
    scales = (groups.abs().amax(dim=2) / 7.0).clamp_min(_MIN_SCALE)  # [out, G]
    values = torch.round(groups / scales[:, :, None]).clamp_(-8, 7).to(torch.int16) + 8
    values = values.reshape(out_features, in_features).to(torch.uint8)
    packed = values[:, 0::2] | (values[:, 1::2] << 4)
    return packed.contiguous(), scales


def dequantise_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The inverse of ``quantise_int4``: fp32 [out, in]."""
    out_features = packed.shape[0]
    low = (packed & 0x0F).to(torch.int16) - 8
    high = (packed >> 4).to(torch.int16) - 8
    values = torch.stack((low, high), dim=2).reshape(out_features, -1).to(torch.float32)
    group_size = values.shape[1] // scales.shape[1]
    grouped = values.reshape(out_features, -1, group_size) * scales[:, :, None]
    return grouped.reshape(out_features, -1)


def outlier_channels(input_amax: torch.Tensor) -> torch.Tensor:
    """Input channels (int64, ascending) whose calibrated max |x_j| exceeds
    ``OUTLIER_RATIO`` x the median channel's, at most ``MAX_OUTLIER_SHARE`` of them."""
    amax = input_amax.to(torch.float32)
    largest = amax.argsort(descending=True)[: int(amax.numel() * MAX_OUTLIER_SHARE)]
    chosen = largest[amax[largest] > OUTLIER_RATIO * float(amax.median())]
    return chosen.sort().values.to(torch.int64)


def smoothing(
    weight: torch.Tensor, input_amax: torch.Tensor, outliers: torch.Tensor | None = None,
    weight_amax: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """SmoothQuant factors [in] for an ``[out, in]`` weight whose inputs reached
    ``input_amax`` [in] (max |x_j| over calibration tokens); 1 for the ``outliers``
    (they run in fp32 and keep their own range). ``weight_amax`` [in]: the weight range
    to use instead of this weight's own (a fused group's joint one, quant_fusion.py)."""
    weight_amax = (weight.abs().amax(dim=0) if weight_amax is None else weight_amax).clamp_min(1e-5)
    factors = input_amax.to(torch.float32).clamp_min(1e-5) ** SMOOTH_ALPHA / weight_amax ** (1 - SMOOTH_ALPHA)
    factors = factors.clamp(1e-3, 1e3)
    if outliers is not None:
        factors[outliers] = 1.0
    return factors


def calibrated(
    weight: torch.Tensor, input_amax: torch.Tensor, weight_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the ``[out, in]`` weight times its smoothing factors with the outlier columns
    zeroed, its companions ``{SMOOTH_SUFFIX: factors [in], OUTLIER_SUFFIX: channels [k],
    OUTLIER_WEIGHT_SUFFIX: their fp32 columns [out, k]}``) from calibration ranges
    (``weight_amax``: a fused group's joint weight range, ``smoothing``)."""
    weight = weight.to(torch.float32)
    outliers = outlier_channels(input_amax)
    factors = smoothing(weight, input_amax, outliers, weight_amax)
    columns = weight.index_select(1, outliers).contiguous()
    smoothed = weight * factors
    smoothed[:, outliers] = 0.0
    extra = {SMOOTH_SUFFIX: factors, OUTLIER_SUFFIX: outliers, OUTLIER_WEIGHT_SUFFIX: columns}
    if weight.shape[1] % ROTATION_BLOCK == 0:
        smoothed, extra[ROTATION_SUFFIX] = rotated(smoothed), torch.tensor([ROTATION_BLOCK])
    return smoothed, extra


def stored_form(
    weight: torch.Tensor, precision: WeightPrecision, input_amax: torch.Tensor | None = None,
    weight_amax: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """What a shard file keeps for an ``[out, in]`` fp32 linear weight: ``{"": values}``
    plus ``{SCALE_SUFFIX: scales}`` when quantised (suffixes of the weight's name), and
    ``calibrated``'s companions when calibration ranges ``input_amax`` are given (no
    outlier tensors when no channel is one; ``weight_amax`` as for ``calibrated``)."""
    extra: dict[str, torch.Tensor] = {}
    if precision in QUANTISED and input_amax is not None:
        weight, extra = calibrated(weight, input_amax, weight_amax)
        extra = {suffix: tensor for suffix, tensor in extra.items() if tensor.numel()}
    if precision == "int8":
        values, scales = quantise_int8(weight)
        return {"": values, SCALE_SUFFIX: scales, **extra}
    if precision == "int4":
        packed, scales = quantise_int4(weight)
        return {"": packed, SCALE_SUFFIX: scales, **extra}
    if precision == "bf16":
        return {"": weight.to(torch.bfloat16).contiguous()}
    return {"": weight.to(torch.float32).contiguous()}


# --- loading: stored tensors -> runtime weights ---------------------------------------


def load_weights(
    where: str,
    stored: Mapping[str, torch.Tensor],
    linears: Mapping[str, bool],
    shapes: Mapping[str, tuple[int, ...]],
    precision: WeightPrecision,
    input_amax: Mapping[str, torch.Tensor] | None = None,
    groups: Sequence[Sequence[str]] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, Weight]]:
    """Split one block's stored tensors into fp32 tensors and runtime linear weights.

    ``linears`` names the linear weights (True: the logical tensor is ``[in, out]``),
    ``shapes`` gives every tensor's logical shape. A quantised stored weight (it has a
    ``NAME_scale`` companion) runs with the int8 kernel whatever ``precision`` says; a
    float one is quantised to ``precision`` here. Raises CheckpointError naming the tensor
    for a stored weight whose dtype or shape is wrong (other shape errors are left to
    ``check_tensors``, which sees the logical shapes). ``groups``: linears that read one
    input (the family's ``fused_linears``): quantised alike, they share one kernel
    (shared/model/quant_fusion.py), and calibrated here, one smoothing factor.
    """
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, Weight | Int8Spec] = {}
    joint = {} if input_amax is None else joint_weight_amax(
        {name: stored[name] for name in linears if name in stored and not linears[name]
         and stored[name].is_floating_point() and name + SCALE_SUFFIX not in stored}, groups)  # fmt: skip
    for name, tensor in stored.items():
        if _is_companion(name, linears):
            continue
        logical = shapes.get(name)
        if name not in linears or logical is None:
            if not tensor.is_floating_point():
                raise CheckpointError(f"{where}: tensor {name!r} has dtype {tensor.dtype}; expected floats")
            tensors[name] = _owned(tensor.to(torch.float32))
            continue
        transposed = linears[name]
        out_in = (logical[1], logical[0]) if transposed else (logical[0], logical[1])
        scales = stored.get(name + SCALE_SUFFIX)
        if scales is not None:
            weights[name] = _stored_quantised(where, name, tensor, scales, out_in, logical, {
                suffix: stored[name + suffix] for suffix in (SMOOTH_SUFFIX, OUTLIER_SUFFIX, OUTLIER_WEIGHT_SUFFIX, ROTATION_SUFFIX)
                if name + suffix in stored})  # fmt: skip
        else:
            amax = None if input_amax is None else input_amax.get(name)
            weights[name] = _from_float(where, name, tensor, transposed, logical, precision, amax, joint.get(name))
    kernels = build_kernels({name: w for name, w in weights.items() if isinstance(w, Int8Spec)}, groups)
    return tensors, {name: w if not isinstance(w, Int8Spec) else kernels[name] for name, w in weights.items()}


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a small ``tensor`` (a norm, a bias) in memory of its own. safetensors'
    ``load_file`` maps the whole shard file, and every tensor it returns keeps that
    mapping alive: one norm kept from it held an int8 block's whole file (4 MB) resident
    after its linear weights were packed (SmolLM2, 30 int8 blocks: 120 MB)."""
    return tensor.clone()


def _is_companion(name: str, linears: Mapping[str, bool]) -> bool:
    return any(name.endswith(suffix) and name[: -len(suffix)] in linears
               for suffix in (SCALE_SUFFIX, SMOOTH_SUFFIX, OUTLIER_SUFFIX, OUTLIER_WEIGHT_SUFFIX,
                              ROTATION_SUFFIX))  # fmt: skip


def _from_float(
    where: str, name: str, tensor: torch.Tensor, transposed: bool,
    logical: tuple[int, ...], precision: WeightPrecision, input_amax: torch.Tensor | None = None,
    weight_amax: torch.Tensor | None = None,
) -> Weight | Int8Spec:  # fmt: skip
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"{where}: tensor {name!r} has dtype {tensor.dtype} but no {name + SCALE_SUFFIX!r}"
        )
    if precision == "fp32" or tuple(tensor.shape) != logical:
        return tensor.to(torch.float32)  # a wrong shape: check_tensors names it
    weight = tensor.to(torch.float32)
    weight = weight.T.contiguous() if transposed else weight
    if precision == "bf16":
        return Bf16Linear(weight, logical)
    factors, outliers, rotation = None, None, False
    if input_amax is not None and tuple(input_amax.shape) == (weight.shape[1],):
        weight, extra = calibrated(weight, input_amax, weight_amax)
        factors, outliers = extra[SMOOTH_SUFFIX], (extra[OUTLIER_SUFFIX], extra[OUTLIER_WEIGHT_SUFFIX])
        rotation = ROTATION_SUFFIX in extra
    if precision == "int4":
        weight = dequantise_int4(*quantise_int4(weight))
    return Int8Spec(*quantise_int8(weight), logical, factors, outliers, rotation)


def _stored_quantised(
    where: str, name: str, values: torch.Tensor, scales: torch.Tensor,
    out_in: tuple[int, int], logical: tuple[int, ...], companions: Mapping[str, torch.Tensor],
) -> Int8Spec:  # fmt: skip
    """What the kernel for stored int8 / int4 ``values`` is built from; ``companions`` maps the suffixes
    present (smoothing, outlier channels and columns) to their tensors."""
    out_features, in_features = out_in

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: quantised tensor {name!r}: {problem}")

    if scales.dtype != torch.float32 or not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise bad("scales must be finite positive fp32 values")
    smooth, outliers, rotation = _checked_companions(bad, companions, out_features, in_features)
    if values.dtype == torch.int8:
        if tuple(values.shape) != out_in or tuple(scales.shape) != (out_features,):
            raise bad(f"int8 {tuple(values.shape)} with scales {tuple(scales.shape)}, expected "
                      f"{out_in} and ({out_features},)")  # fmt: skip
        return Int8Spec(values, scales, logical, smooth, outliers, rotation)
    if values.dtype == torch.uint8:
        groups = scales.shape[1] if scales.dim() == 2 else 0
        if (
            tuple(values.shape) != (out_features, in_features // 2)
            or in_features % 2
            or groups < 1
            or scales.shape[0] != out_features
            or in_features % groups
            or (in_features // groups) % 2
        ):
            raise bad(f"int4 {tuple(values.shape)} with scales {tuple(scales.shape)} does not fit {out_in}")
        return Int8Spec(*quantise_int8(dequantise_int4(values, scales)), logical, smooth, outliers, rotation)
    raise bad(f"dtype {values.dtype} is neither int8 nor packed int4 (uint8)")


def _checked_companions(
    bad: Callable[[str], CheckpointError], companions: Mapping[str, torch.Tensor],
    out_features: int, in_features: int,
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None, bool]:  # fmt: skip
    """(smoothing factors, (outlier channels, their columns), rotated) after checking
    them; raises ``bad(problem)``."""
    smooth = companions.get(SMOOTH_SUFFIX)
    if smooth is not None and (
        smooth.dtype != torch.float32 or tuple(smooth.shape) != (in_features,)
        or not bool(torch.isfinite(smooth).all()) or bool((smooth <= 0).any())
    ):  # fmt: skip
        raise bad(f"smoothing factors must be finite positive fp32 [{in_features}]")
    rotation = companions.get(ROTATION_SUFFIX)
    if rotation is not None and (
        rotation.dtype != torch.int64 or rotation.tolist() != [ROTATION_BLOCK] or in_features % ROTATION_BLOCK
    ):  # fmt: skip
        raise bad(f"rotation must be int64 [{ROTATION_BLOCK}] on an input width that is a multiple of it")
    rotated_values = rotation is not None
    channels, columns = companions.get(OUTLIER_SUFFIX), companions.get(OUTLIER_WEIGHT_SUFFIX)
    if channels is None and columns is None:
        return smooth, None, rotated_values
    if channels is None or columns is None:
        raise bad(f"{OUTLIER_SUFFIX!r} and {OUTLIER_WEIGHT_SUFFIX!r} must come together")
    count = channels.numel()
    if (
        channels.dtype != torch.int64 or channels.dim() != 1 or count > in_features
        or (count and (int(channels[0]) < 0 or int(channels[-1]) >= in_features
                       or not bool((channels[1:] > channels[:-1]).all())))
    ):  # fmt: skip
        raise bad(f"outlier channels must be ascending distinct int64 indices in [0, {in_features})")
    if columns.dtype != torch.float32 or tuple(columns.shape) != (out_features, count):
        raise bad(f"outlier columns must be fp32 [{out_features}, {count}], got "
                  f"{columns.dtype} {tuple(columns.shape)}")  # fmt: skip
    return smooth, (channels, columns), rotated_values


def weight_bytes(weights: Mapping[str, Weight]) -> int:
    """Bytes the runtime weights hold (tensors and packed kernels)."""
    return sum(
        w.nbytes if not isinstance(w, torch.Tensor) else w.numel() * w.element_size()
        for w in weights.values()
    )
