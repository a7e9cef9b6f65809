"""The kernels quantised linear weights run with (shared/model/quant.py makes them).

``Int8Linear``: fbgemm's dynamic quantised linear (int8 weights per output channel,
activations quantised per call), with SmoothQuant factors, fp32 outlier channels and
a block Hadamard rotation of its inputs when its weights were calibrated;
``Bf16Linear``: a bf16 ``F.linear``.
"""

from __future__ import annotations

import math
import warnings
from typing import cast

import torch
import torch.nn.functional as F

ROTATION_BLOCK = 64
"""Calibrated int8 weights and their inputs are rotated by a block-diagonal Hadamard
matrix of this size along the input dimension (QuaRot-style; x W^T = (x H)(W H)^T, H
orthonormal and symmetric): rounding error is spread evenly over a block's channels
instead of being set by its largest one. Inputs whose width is not a multiple run unrotated."""


def _cpu_has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI (Linux /proc/cpuinfo; False when unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return any(line.startswith("flags") and " avx512_vnni" in line for line in info)
    except OSError:
        return False


REDUCE_RANGE = not _cpu_has_vnni()
"""fbgemm's kernels without VNNI add pairs of u8 x s8 products in 16 bits, which
saturate unless activations keep 7 bits (``reduce_range``); with VNNI (vpdpbusd, 32-bit
sums) all 8 bits are exact."""


def _hadamard(size: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix [size, size] (size a power of two)."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix / math.sqrt(size)


_HADAMARD = _hadamard(ROTATION_BLOCK)


def rotated(matrix: torch.Tensor) -> torch.Tensor:
    """[R, in] times the block-diagonal Hadamard matrix (``in`` a multiple of ``ROTATION_BLOCK``)."""
    rows, width = matrix.shape  # one [rows * blocks, B] x [B, B] product (a plain mm is fastest)
    return torch.mm(matrix.reshape(-1, ROTATION_BLOCK), _HADAMARD).view(rows, width)


class Int8Linear:
    """y = x W^T with W int8 per output channel, through fbgemm's dynamic linear.

    ``values`` int8 [out, in], ``scales`` fp32 [out] (> 0), ``smooth`` the SmoothQuant
    factors [in] the values carry, ``outliers`` (int64 channels [k], fp32 weight columns
    [out, k], unsmoothed) the input channels run in fp32: the int8 kernel sees zeros
    there (its values are 0 in those columns too), so its per-row activation scale and
    the weights' per-row scales are set by the other channels. ``rotation``: the values
    are of the weights times the block Hadamard matrix (``rotated``), so the inputs are
    rotated alike before the kernel. The fp32 weights are never materialised. ``shape``
    is the logical ``[out, in]``; ``nbytes`` what it holds.
    """

    def __init__(
        self, values: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...] | None = None,
        smooth: torch.Tensor | None = None,
        outliers: tuple[torch.Tensor, torch.Tensor] | None = None, rotation: bool = False,
    ) -> None:  # fmt: skip
        out_features, in_features = values.shape
        inverse = None if smooth is None else 1.0 / smooth.to(torch.float32)
        self._outliers: torch.Tensor | None = None
        self._outlier_weight = torch.zeros(0, out_features)  # [k, out]
        if outliers is not None and outliers[0].numel():
            index, columns = outliers[0].to(torch.long).clone(), outliers[1].to(torch.float32)
            inverse = torch.ones(in_features) if inverse is None else inverse.clone()
            inverse[index] = 0.0
            self._outliers, self._outlier_weight = index, columns.T.clone(memory_format=torch.contiguous_format)
        self._inverse_smooth = inverse
        self._rotation = rotation
        zero_points = torch.zeros(out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantised tensor creation is marked deprecated
            warnings.simplefilter("ignore")
            # the public quantize_per_channel would need the fp32 weights: build from int8
            quantised = torch._make_per_channel_quantized_tensor(  # noqa: SLF001
                values.contiguous(), scales.to(torch.float64), zero_points, 0
            )
            self._packed = torch.ops.quantized.linear_prepack(quantised, None)
        self.shape = shape or (int(out_features), int(in_features))  # logical (GPT-2: [in, out])
        extra = self._outlier_weight.numel() * 4 + (0 if self._outliers is None else self._outliers.numel() * 8)
        self.nbytes = int(values.numel() + scales.numel() * 4 + (0 if inverse is None else in_features * 4) + extra)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] fp32 -> [T, out] fp32.

        The kernel quantises its whole input with one scale; rows of a prompt differ in
        range by orders of magnitude (the first token's hidden state is huge), so each row
        is brought to max |x| = 1 first and its output scaled back (exact for a linear
        map): the activations are in effect quantised per row. One row (a decode step)
        already is. Outlier channels are zeroed for the kernel and added back as an fp32
        product."""
        inner = x if self._inverse_smooth is None else x * self._inverse_smooth
        if self._rotation:  # the values were rotated alike
            inner = rotated(inner)
        if inner.shape[0] == 1:
            y = torch.ops.quantized.linear_dynamic(inner.contiguous(), self._packed, REDUCE_RANGE)
        else:
            row_scale = inner.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12)  # [T, 1]
            y = torch.ops.quantized.linear_dynamic((inner / row_scale).contiguous(), self._packed, REDUCE_RANGE)
            y = y * row_scale
        if self._outliers is None:
            return cast(torch.Tensor, y)
        return torch.addmm(y, x.index_select(1, self._outliers), self._outlier_weight)


class Bf16Linear:
    """y = x W^T with W held in bfloat16 (computed in bf16, returned as fp32)."""

    def __init__(self, weight: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        self.weight = weight.to(torch.bfloat16).contiguous()  # [out, in]
        self.shape = shape or (int(weight.shape[0]), int(weight.shape[1]))
        self.nbytes = int(self.weight.numel() * 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).to(torch.float32)
