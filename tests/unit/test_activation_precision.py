"""Compressed activation frames (shared/tensor_frame.py): fp16 and int8 with a scale per
row round-trip within their step, fp32 stays exact, and the frame checks refuse a bad
layout or scale with a typed error."""

from __future__ import annotations

import numpy as np
import pytest

from services.worker.errors import FrameRefused
from services.worker.frame_checks import FrameLimits, check_activation
from shared.errors import TensorFrameError
from shared.frame_headers import ActivationHeader
from shared.tensor_frame import (
    compress_activation,
    decode_frame,
    decompress_activation,
    encode_frame,
)

HIDDEN = 64


def _activations(rows: int = 5) -> np.ndarray:
    array = np.random.default_rng(0).standard_normal((rows, HIDDEN)).astype(np.float32)
    array[1] *= 300.0  # rows with very different ranges: one scale per row matters
    return array


def _header() -> ActivationHeader:
    return ActivationHeader(request_id="r1", step=0, epoch=1, seq=0, src="a", sent_at=0.0,  # type: ignore[arg-type]
                            target=1, pos=0, last_only=False, pass_id=0)  # fmt: skip


def test_fp32_is_exact_and_unchanged() -> None:
    array = _activations()
    assert compress_activation(array, "fp32") is array
    assert decompress_activation(array, HIDDEN) is array


@pytest.mark.parametrize(("precision", "dtype", "width", "relative"),
                         [("fp16", np.float16, HIDDEN, 1e-3), ("int8", np.int8, HIDDEN + 4, 1 / 254)])  # fmt: skip
def test_compressed_round_trip_through_a_frame(precision: str, dtype: type, width: int, relative: float) -> None:
    array = _activations()
    packed = compress_activation(array, precision)
    assert packed.dtype == dtype and packed.shape == (5, width)
    _, received = decode_frame(encode_frame(_header(), packed))
    restored = decompress_activation(received, HIDDEN)
    assert restored.dtype == np.float32 and restored.shape == array.shape
    row_max = np.abs(array).max(axis=1, keepdims=True)
    assert bool(np.all(np.abs(restored - array) <= relative * row_max + 1e-7))
    assert packed.nbytes <= (0.5 if precision == "fp16" else (HIDDEN + 4) / (4 * HIDDEN)) * array.nbytes


def test_bad_layouts_and_scales_are_typed_errors() -> None:
    limits = FrameLimits(hidden_size=HIDDEN, max_positions=128, num_kv_heads=2, head_dim=16)
    packed = compress_activation(_activations(), "int8")
    check_activation(_header(), packed, limits)  # a well-formed int8 frame passes
    bad_scale = packed.copy()
    bad_scale[0, HIDDEN:] = np.array([np.nan], dtype="<f4").view(np.int8)
    for array in (bad_scale, packed[:, :HIDDEN], np.zeros((2, HIDDEN), dtype=np.int16)):
        with pytest.raises(FrameRefused):
            check_activation(_header(), array, limits)
    with pytest.raises(TensorFrameError):
        compress_activation(_activations(), "int4")
    with pytest.raises(TensorFrameError):
        decompress_activation(np.zeros((2, HIDDEN + 4), dtype=np.int16), HIDDEN)


def test_compressed_results_pass_the_checks_and_bad_ones_are_refused() -> None:
    """A plan may compress the hop back to the entry too (Plan.link_precisions)."""
    from services.worker.frame_checks import check_result
    from shared.frame_headers import ResultHeader

    limits = FrameLimits(hidden_size=HIDDEN, max_positions=128, num_kv_heads=2, head_dim=16)
    header = ResultHeader(request_id="r1", step=0, epoch=1, seq=0, src="a", sent_at=0.0, pass_id=0)  # type: ignore[arg-type]
    for precision in ("fp32", "fp16", "int8"):
        check_result(header, compress_activation(_activations(), precision), limits)
    bad_scale = compress_activation(_activations(), "int8")
    bad_scale[0, HIDDEN:] = np.array([np.inf], dtype="<f4").view(np.int8)
    infinite = compress_activation(_activations(), "fp16")
    infinite[0, 0] = np.inf
    for array in (bad_scale, infinite, bad_scale[:, :HIDDEN]):
        with pytest.raises(FrameRefused):
            check_result(header, array, limits)
