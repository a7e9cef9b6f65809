"""One int8 kernel for the linears that read the same input (q, k, v; gate, up).

fbgemm's dynamic linear pays a fixed cost per call (quantising its input, and the
smoothing, rotation and outlier product around it: about 40 us on one row on the AMD
EPYC these tests run on, whatever the weight's size), so a one-row decode step spends
more on the three small q/k/v projections than on the weights they read. Linears that
share their input, and whose input transform is the same (the same smoothing factors,
outlier channels and rotation), are packed as one kernel over their stacked rows: one
call, and each linear's output is its column range of the result (an exact split: the
rows of ``x W^T`` do not mix). The grouping is each family's ``fused_linears(config)``;
calibration gives a group one smoothing factor from the group's joint weight range
(SmoothQuant's QKV form) so the transforms match. Stores written before that keep a
factor per linear: they load and run unfused, as then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from shared.model.quant_kernels import Int8Linear


@dataclass(frozen=True, eq=False)
class Int8Spec:
    """The arguments of an ``Int8Linear``, before its weights are packed (see it)."""

    values: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # fp32 [out]
    shape: tuple[int, ...]  # logical
    smooth: torch.Tensor | None = None
    outliers: tuple[torch.Tensor, torch.Tensor] | None = None
    rotation: bool = False

    def build(self) -> Int8Linear:
        return Int8Linear(self.values, self.scales, self.shape, self.smooth, self.outliers, self.rotation)


class FusedPart:
    """One linear's rows of a fused kernel: called alone it runs the whole kernel and
    keeps its columns; ``linear_group`` (shared/model/layers.py) calls the kernel once
    for all its parts. ``nbytes`` is its share of the kernel's (they sum to it)."""

    def __init__(self, kernel: Int8Linear, start: int, stop: int, nbytes: int) -> None:
        self.kernel, self.start, self.stop = kernel, start, stop
        self.shape: tuple[int, ...] = (stop - start, int(kernel.shape[1]))
        self.nbytes = nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)[:, self.start : self.stop]


def fused_parts(weights: Sequence[object]) -> list[FusedPart] | None:
    """``weights`` as parts of one kernel, or None when they are not all its parts."""
    parts = [w for w in weights if isinstance(w, FusedPart)]
    if not parts or len(parts) != len(weights) or any(p.kernel is not parts[0].kernel for p in parts):
        return None
    return parts


def joint_weight_amax(
    weights: Mapping[str, torch.Tensor], groups: Iterable[Sequence[str]]
) -> dict[str, torch.Tensor]:
    """For each group whose members are all in ``weights`` (fp32 ``[out, in]`` of one
    width), every member's name -> max |W_:j| over the whole group [in]: the weight range
    SmoothQuant sets one factor per input channel from."""
    joint: dict[str, torch.Tensor] = {}
    for group in groups:
        members = [weights.get(name) for name in group]
        present = [w for w in members if w is not None]
        if len(present) != len(group) or any(w.dim() != 2 for w in present):
            continue  # a malformed member: the shape checks after loading name it
        if len({int(w.shape[1]) for w in present}) != 1:
            continue
        amax = torch.stack([w.to(torch.float32).abs().amax(dim=0) for w in present]).amax(dim=0)
        joint.update((name, amax) for name in group)
    return joint


def build_kernels(
    specs: Mapping[str, Int8Spec], groups: Iterable[Sequence[str]]
) -> dict[str, Int8Linear | FusedPart]:
    """Pack each spec: the members of a group that are all here with one input
    transform share one kernel (``FusedPart`` each); the rest get one each."""
    built: dict[str, Int8Linear | FusedPart] = {}
    for group in groups:
        members = [specs.get(name) for name in group]
        present = [s for s in members if s is not None]
        if len(present) < 2 or len(present) != len(group) or not _same_transform(present):
            continue
        kernel = _fused(present).build()
        start, shared = 0, 0
        for index, (name, spec) in enumerate(zip(group, present, strict=True)):
            rows = int(spec.values.shape[0])
            share = kernel.nbytes - shared if index == len(group) - 1 else kernel.nbytes * rows // kernel.shape[0]
            built[name] = FusedPart(kernel, start, start + rows, int(share))
            start, shared = start + rows, shared + int(share)
    for name, spec in specs.items():
        if name not in built:
            built[name] = spec.build()
    return built


def _same_transform(specs: Sequence[Int8Spec]) -> bool:
    first = specs[0]
    width = int(first.values.shape[1])
    for spec in specs:
        if tuple(spec.shape) != tuple(spec.values.shape) or int(spec.values.shape[1]) != width:
            return False  # a transposed logical shape (GPT-2) or another input width
        if spec.rotation != first.rotation or not _equal(spec.smooth, first.smooth):
            return False
        if not _equal(_channels(spec), _channels(first)):
            return False
    return True


def _channels(spec: Int8Spec) -> torch.Tensor | None:
    if spec.outliers is None or not spec.outliers[0].numel():
        return None
    return spec.outliers[0]


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def _fused(specs: Sequence[Int8Spec]) -> Int8Spec:
    values = torch.cat([s.values for s in specs], dim=0)
    scales = torch.cat([s.scales.to(torch.float32) for s in specs], dim=0)
    outliers = None
    channels = _channels(specs[0])
    if channels is not None:
        columns = torch.cat([s.outliers[1] for s in specs if s.outliers is not None], dim=0)
        outliers = (channels, columns)
    first = specs[0]
    return Int8Spec(values, scales, tuple(values.shape), first.smooth, outliers, first.rotation)
