"""Calibration for SmoothQuant: how large each linear layer's inputs get, per channel.

``input_ranges`` runs an fp32 pipeline once over a fixed calibration text (not the
evaluation text of bench/quality.py) with every linear weight wrapped in a recorder,
and returns max |x_j| per input channel j of each block's linears and of the head. The
int8 kernel quantises activations per row; a few channels (the "massive activations" of
Llama-family models) are 100x larger than the rest, so without smoothing every other
channel of their row keeps only a few levels (measured: SmolLM2 perplexity +15 %).
``quant.smoothing`` moves part of that range into the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from shared.model.config import ModelConfig
from shared.model.kv_cache import SegmentCache
from shared.model.quant import Weight
from shared.model.runtime import FAMILIES, EntryRuntime, SegmentRuntime
from shared.model.tokenizer import TextTokenizer


class _Pipeline(Protocol):
    """What calibration needs of a ``LocalPipeline`` (which imports this module)."""

    config: ModelConfig
    entry: EntryRuntime
    segments: list[SegmentRuntime]

    @property
    def tokenizer(self) -> TextTokenizer: ...

    def hidden_states(
        self, token_ids: torch.Tensor, caches: Sequence[SegmentCache] | None, start_position: int
    ) -> torch.Tensor: ...

CALIBRATION_TEXT = (
    "Edge computers sit close to where data is made: a road-side unit at a junction, a "
    "gateway in a factory hall, a box beside a camera on a lamp post. Each one is small, "
    "and the links between them change from second to second. A language model that is too "
    "large for one of them can still run when its layers are split across several, as long "
    "as the hidden state that passes from one to the next is small and arrives on time.\n\n"
    "Q: What is the capital of France?\nA: Paris is the capital of France.\n"
    "def add(a, b):\n    return a + b\n\n"
    "In 1969 the first humans walked on the Moon; 384,400 km separate it from the Earth. "
    "Recipes, letters, poems and lists of numbers all look different to a model, which is "
    "why a calibration text mixes them: 3, 14, 159, 2653, 58979."
)


class _Recorder:
    """Stands in for a linear weight; records max |x| per input column, then computes."""

    def __init__(self, weight: Weight, transposed: bool) -> None:
        self.weight, self.transposed = weight, transposed
        self.shape, self.nbytes = tuple(weight.shape), 0
        self.amax: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        seen = x.abs().amax(dim=0)
        self.amax = seen if self.amax is None else torch.maximum(self.amax, seen)
        if not isinstance(self.weight, torch.Tensor):
            return self.weight(x)
        return x @ self.weight if self.transposed else x @ self.weight.T


def input_ranges(
    pipeline: _Pipeline, text: str = CALIBRATION_TEXT
) -> tuple[dict[int, dict[str, torch.Tensor]], torch.Tensor | None]:
    """(block index -> linear name -> max |x| per input channel, the head's) of one pass
    of ``pipeline`` (fp32) over ``text``. The pipeline is left as it was."""
    transposed = FAMILIES[pipeline.config.architecture].linear_weights(pipeline.config)
    recorders: list[tuple[dict[str, Weight], str, _Recorder, int]] = []
    for segment in pipeline.segments:
        for index, linears in segment.linear_layers():
            for name, weight in list(linears.items()):
                recorder = _Recorder(weight, transposed.get(name, False))
                linears[name] = recorder
                recorders.append((linears, name, recorder, index))
    head = pipeline.entry.head
    head_recorder = None if head is None else _Recorder(head, False)
    if head_recorder is not None:
        pipeline.entry.head = head_recorder
    try:
        ids = pipeline.tokenizer.encode(text)[: pipeline.config.max_positions]
        hidden = pipeline.hidden_states(torch.tensor(ids, dtype=torch.long), None, 0)
        if pipeline.config.is_decoder:
            pipeline.entry.logits(hidden)
    finally:
        for linears, name, recorder, _ in recorders:
            linears[name] = recorder.weight
        if head is not None:
            pipeline.entry.head = head
    ranges: dict[int, dict[str, torch.Tensor]] = {}
    for _, name, recorder, index in recorders:
        if recorder.amax is not None:
            ranges.setdefault(index, {})[name] = recorder.amax
    return ranges, None if head_recorder is None else head_recorder.amax
