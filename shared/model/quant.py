"""Quantised linear weights: the stored form, and the kernels they run with.

Quantisation is a transform applied to a model's linear layers when they are loaded;
the model files stay plain. Each family names its linear weights
(``linear_weights(config)``: name -> True when the checkpoint stores it ``[in, out]``,
GPT-2's Conv1D); everything else (norms, biases, embeddings) stays fp32.

Precisions (``--weights``):

- ``fp32``: as today.
- ``bf16``: weights held in bfloat16, run with a bf16 ``F.linear`` (half the memory).
- ``int8``: symmetric int8 per output channel (scale = max|w| / 127, one fp32 scale per
  row), run with fbgemm's dynamic quantised linear (activations quantised per call, per
  row (``Int8Linear``), ``reduce_range`` on: this CPU has no VNNI, and 8-bit
  activations saturate fbgemm's 16-bit accumulation). ``_weight_int8pack_mm`` was measured 10x slower than fp32 here.
- ``int4``: symmetric int4 in groups of ``INT4_GROUP_SIZE`` input columns (one fp32
  scale per group), two values a byte. No int4 kernel on this CPU beats fp32
  (``_weight_int4pack_mm_for_cpu`` is 16x slower), so at load the int4 values are
  dequantised and re-quantised per output channel to int8 and run with the int8
  kernel: int4 quality at int8 speed and int8 memory; it saves disk and transfer only.

Activations are quantised per row inside the kernel; a few channels of Llama-family
hidden states are 100x larger than the rest, so int8 and int4 weights are smoothed
(SmoothQuant): per input channel the weights are multiplied and the inputs divided by
factors from one fp32 calibration pass (shared/model/calibrate.py), stored as
``NAME_smooth`` [in]. A worker quantising an fp32 store at load has no calibration and
runs unsmoothed (lower quality): quantise with ``edgesplit shard --weights``.

Stored form in a shard file (``edgesplit shard --weights int8|int4``): the tensor keeps
its name and holds the integer values ``[out, in]`` (int8) or ``[out, in / 2]`` (uint8,
low nibble = even column, values + 8); ``NAME_scale`` holds the fp32 scales ``[out]``
(int8) or ``[out, in / group]`` (int4). Always ``[out, in]``, also for GPT-2's Conv1D.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Literal, Protocol, cast

import torch
import torch.nn.functional as F

from shared.errors import CheckpointError, ConfigError

WeightPrecision = Literal["fp32", "bf16", "int8", "int4"]
PRECISIONS: tuple[WeightPrecision, ...] = ("fp32", "bf16", "int8", "int4")
QUANTISED: tuple[WeightPrecision, ...] = ("int8", "int4")
SCALE_SUFFIX = "_scale"
SMOOTH_SUFFIX = "_smooth"
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


class Int8Linear:
    """y = x W^T with W int8 per output channel, through fbgemm's dynamic linear.

    ``values`` int8 [out, in], ``scales`` fp32 [out] (> 0). The fp32 weights are never
    materialised. ``shape`` is the logical ``[out, in]``; ``nbytes`` what it holds.
    """

    def __init__(
        self, values: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...] | None = None,
        smooth: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        out_features, in_features = values.shape
        self._inverse_smooth = None if smooth is None else (1.0 / smooth.to(torch.float32))
        zero_points = torch.zeros(out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantised tensor creation is marked deprecated
            warnings.simplefilter("ignore")
            # the public quantize_per_channel would need the fp32 weights: build from int8
            quantised = torch._make_per_channel_quantized_tensor(  # noqa: SLF001
                values.contiguous(), scales.to(torch.float64), zero_points, 0
            )
            self._packed = torch.ops.quantized.linear_prepack(quantised, None)
        self.shape = shape or (int(out_features), int(in_features))  # logical (GPT-2: [in, out])
        self.nbytes = int(values.numel() + scales.numel() * 4 + (0 if smooth is None else in_features * 4))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] fp32 -> [T, out] fp32.

        The kernel quantises its whole input with one scale; rows of a prompt differ in
        range by orders of magnitude (the first token's hidden state is huge), so each row
        is brought to max |x| = 1 first and its output scaled back (exact for a linear
        map): the activations are in effect quantised per row."""
        if self._inverse_smooth is not None:  # the weights carry the smoothing factors
            x = x * self._inverse_smooth
        row_scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)  # [T, 1]
        y = torch.ops.quantized.linear_dynamic((x / row_scale).contiguous(), self._packed, True)
        return cast(torch.Tensor, y * row_scale)


class Bf16Linear:
    """y = x W^T with W held in bfloat16 (computed in bf16, returned as fp32)."""

    def __init__(self, weight: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        self.weight = weight.to(torch.bfloat16).contiguous()  # [out, in]
        self.shape = shape or (int(weight.shape[0]), int(weight.shape[1]))
        self.nbytes = int(self.weight.numel() * 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).to(torch.float32)


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


def smoothing(weight: torch.Tensor, input_amax: torch.Tensor) -> torch.Tensor:
    """SmoothQuant factors [in] for an ``[out, in]`` weight whose inputs reached
    ``input_amax`` [in] (max |x_j| over calibration tokens)."""
    weight_amax = weight.abs().amax(dim=0).clamp_min(1e-5)
    factors = input_amax.to(torch.float32).clamp_min(1e-5) ** SMOOTH_ALPHA / weight_amax ** (1 - SMOOTH_ALPHA)
    return factors.clamp(1e-3, 1e3)


def stored_form(
    weight: torch.Tensor, precision: WeightPrecision, input_amax: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """What a shard file keeps for an ``[out, in]`` fp32 linear weight: ``{"": values}``
    plus ``{SCALE_SUFFIX: scales}`` when quantised (suffixes of the weight's name), and
    ``{SMOOTH_SUFFIX: factors}`` when calibration ranges ``input_amax`` are given."""
    extra: dict[str, torch.Tensor] = {}
    if precision in QUANTISED and input_amax is not None:
        factors = smoothing(weight.to(torch.float32), input_amax)
        weight, extra = weight.to(torch.float32) * factors, {SMOOTH_SUFFIX: factors}
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
) -> tuple[dict[str, torch.Tensor], dict[str, Weight]]:
    """Split one block's stored tensors into fp32 tensors and runtime linear weights.

    ``linears`` names the linear weights (True: the logical tensor is ``[in, out]``),
    ``shapes`` gives every tensor's logical shape. A quantised stored weight (it has a
    ``NAME_scale`` companion) runs with the int8 kernel whatever ``precision`` says; a
    float one is quantised to ``precision`` here. Raises CheckpointError naming the tensor
    for a stored weight whose dtype or shape is wrong (other shape errors are left to
    ``check_tensors``, which sees the logical shapes).
    """
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, Weight] = {}
    for name, tensor in stored.items():
        if _is_companion(name, linears):
            continue
        logical = shapes.get(name)
        if name not in linears or logical is None:
            if not tensor.is_floating_point():
                raise CheckpointError(f"{where}: tensor {name!r} has dtype {tensor.dtype}; expected floats")
            tensors[name] = tensor.to(torch.float32)
            continue
        transposed = linears[name]
        out_in = (logical[1], logical[0]) if transposed else (logical[0], logical[1])
        scales = stored.get(name + SCALE_SUFFIX)
        smooth = stored.get(name + SMOOTH_SUFFIX)
        if scales is not None:
            weights[name] = _stored_quantised(where, name, tensor, scales, out_in, logical, smooth)
        else:
            amax = None if input_amax is None else input_amax.get(name)
            weights[name] = _from_float(where, name, tensor, transposed, logical, precision, amax)
    return tensors, weights


def _is_companion(name: str, linears: Mapping[str, bool]) -> bool:
    return any(name.endswith(suffix) and name[: -len(suffix)] in linears
               for suffix in (SCALE_SUFFIX, SMOOTH_SUFFIX))  # fmt: skip


def _from_float(
    where: str, name: str, tensor: torch.Tensor, transposed: bool,
    logical: tuple[int, ...], precision: WeightPrecision, input_amax: torch.Tensor | None = None,
) -> Weight:  # fmt: skip
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
    factors = None
    if input_amax is not None and tuple(input_amax.shape) == (weight.shape[1],):
        factors = smoothing(weight, input_amax)
        weight = weight * factors
    if precision == "int8":
        return Int8Linear(*quantise_int8(weight), logical, factors)
    return Int8Linear(*quantise_int8(dequantise_int4(*quantise_int4(weight))), logical, factors)


def _stored_quantised(
    where: str, name: str, values: torch.Tensor, scales: torch.Tensor,
    out_in: tuple[int, int], logical: tuple[int, ...], smooth: torch.Tensor | None = None,
) -> Int8Linear:  # fmt: skip
    out_features, in_features = out_in

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: quantised tensor {name!r}: {problem}")

    if scales.dtype != torch.float32 or not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
        raise bad("scales must be finite positive fp32 values")
    if smooth is not None and (
        smooth.dtype != torch.float32 or tuple(smooth.shape) != (in_features,)
        or not bool(torch.isfinite(smooth).all()) or bool((smooth <= 0).any())
    ):  # fmt: skip
        raise bad(f"smoothing factors must be finite positive fp32 [{in_features}]")
    if values.dtype == torch.int8:
        if tuple(values.shape) != out_in or tuple(scales.shape) != (out_features,):
            raise bad(f"int8 {tuple(values.shape)} with scales {tuple(scales.shape)}, expected "
                      f"{out_in} and ({out_features},)")  # fmt: skip
        return Int8Linear(values, scales, logical, smooth)
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
        return Int8Linear(*quantise_int8(dequantise_int4(values, scales)), logical, smooth)
    raise bad(f"dtype {values.dtype} is neither int8 nor packed int4 (uint8)")


def weight_bytes(weights: Mapping[str, Weight]) -> int:
    """Bytes the runtime weights hold (tensors and packed kernels)."""
    return sum(
        w.nbytes if not isinstance(w, torch.Tensor) else w.numel() * w.element_size()
        for w in weights.values()
    )
