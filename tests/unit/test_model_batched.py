"""Batched decode steps (`SegmentRuntime.forward_batch`) equal one step per request.

Several requests of different prompt lengths decode greedily side by side; between steps
requests join (after their own prefill, which runs alone) and leave. Each step of the
requests in flight is ONE batched forward per segment; every logit must match the
unbatched reference within 1e-5 relative (fp32) and every greedy token must be identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from shared.model.checkpoint import Checkpoint
from shared.model.kv_cache import CacheMismatch, SegmentCache
from shared.model.pipeline import LocalPipeline
from shared.model.runtime import SegmentRuntime
from shared.model.tiny import write_tiny_checkpoint

LAYERS = 4
CUTS = [(0, 1), (1, 3), (3, 4)]  # three segments, as three workers would hold them
PROMPTS = [[5, 17, 42], [9, 250, 61, 7, 8, 120, 33, 64, 3, 11], [77], [12, 13, 14, 15, 16, 17]]
# request i joins at step JOIN[i] and decodes STEPS[i] tokens: they overlap, join and leave
JOIN = [0, 0, 2, 5]
STEPS = [9, 4, 12, 6]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batched")
    return {arch: write_tiny_checkpoint(arch, root / arch, LAYERS, seed=3) for arch in ("llama", "gpt2")}


@dataclass
class _Stream:
    prompt: list[int]
    steps: int
    caches: list[SegmentCache]
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    position: int = 0


def _run_batched(model: Path, weights: str | None = None) -> list[_Stream]:
    """Greedy decoding of all PROMPTS with requests joining and leaving; every decode
    step of the requests in flight is one `forward_batch` per segment."""
    pipeline = LocalPipeline(model, [end for _, end in CUTS[:-1]], weights=weights)  # int8: calibrated
    entry, segments = pipeline.entry, pipeline.segments
    streams = [_Stream(p, s, [seg.new_cache() for seg in segments]) for p, s in zip(PROMPTS, STEPS, strict=True)]
    step, live = 0, []
    while step == 0 or live:
        for index, stream in enumerate(streams):
            if JOIN[index] == step:  # joins: its prefill runs alone, then it decodes with the rest
                hidden = entry.embed(torch.tensor(stream.prompt), 0)
                for segment, cache in zip(segments, stream.caches, strict=True):
                    hidden = segment.forward(hidden, cache, 0)
                stream.position = len(stream.prompt)
                _take(stream, entry.logits(hidden[-1:])[0])
                live.append(stream)
        decoding = [s for s in live if len(s.tokens) < s.steps]
        if decoding:
            positions = [s.position for s in decoding]
            hidden = torch.cat([entry.embed(torch.tensor(s.tokens[-1:]), s.position) for s in decoding])
            for number, segment in enumerate(segments):
                hidden = segment.forward_batch(hidden, [s.caches[number] for s in decoding], positions)
            for row, stream in enumerate(decoding):
                stream.position += 1
                _take(stream, entry.logits(hidden[row : row + 1])[0])
        live = [s for s in live if len(s.tokens) < s.steps]  # finished requests leave
        step += 1
    return streams


def _take(stream: _Stream, logits: torch.Tensor) -> None:
    stream.logits.append(logits)
    stream.tokens.append(int(torch.argmax(logits)))


def _reference(model: Path, prompt: list[int], steps: int, weights: str | None = None) -> list[torch.Tensor]:
    """The logits of each greedy step of one request alone (one `forward` per step)."""
    pipeline = LocalPipeline(model, [end for _, end in CUTS[:-1]], weights=weights)
    logits, tokens = [], list(prompt)
    caches = [segment.new_cache() for segment in pipeline.segments]
    step_input, position = list(prompt), 0
    for _ in range(steps):
        hidden = pipeline.entry.embed(torch.tensor(step_input), position)
        for segment, cache in zip(pipeline.segments, caches, strict=True):
            hidden = segment.forward(hidden, cache, position)
        logits.append(pipeline.entry.logits(hidden[-1:])[0])
        position += len(step_input)
        step_input = [int(torch.argmax(logits[-1]))]
        tokens += step_input
    return logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_decode_equals_one_request_at_a_time(tiny: dict[str, Path], arch: str) -> None:
    streams = _run_batched(tiny[arch])
    for stream in streams:
        reference = _reference(tiny[arch], stream.prompt, stream.steps)
        assert [int(torch.argmax(r)) for r in reference] == stream.tokens
        got, want = torch.stack(stream.logits), torch.stack(reference)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert len({tuple(s.tokens) for s in streams}) == len(streams)  # distinct requests


@pytest.mark.parametrize("weights", ["int8", "bf16"])
def test_batched_decode_runs_quantised_weights(tiny: dict[str, Path], weights: str) -> None:
    """Quantised kernels take stacked rows too. bf16 runs each row as fp32 does: tokens
    identical. int8 brings every row to max |x| = 1, but fbgemm then quantises the whole
    [B, in] input with one range, so a row's rounding depends a little on its
    batch-mates: logits move within int8's own noise (the kernel's 3 % bound in
    test_quant.py, on each side of the comparison: 6 %), and on a random tiny model
    whose top logits nearly tie a greedy token can flip (int8 batching is not exact)."""
    streams = _run_batched(tiny["llama"], weights)
    for stream in streams:
        want = torch.stack(_reference(tiny["llama"], stream.prompt, stream.steps, weights))
        if weights == "bf16":
            assert [int(torch.argmax(row)) for row in want] == stream.tokens
        # compare the first step that follows a token both runs took (the rest diverge)
        same = next((i for i, (a, b) in enumerate(zip(want.argmax(1).tolist(), stream.tokens, strict=False)) if a != b), len(want))
        got = torch.stack(stream.logits)[: same + 1]
        bound = 0.06 if weights == "int8" else 1e-3
        assert float((got - want[: same + 1]).abs().max()) <= bound * float(want.abs().max())


def test_a_batch_refuses_a_cache_at_the_wrong_position_and_leaves_all_caches_as_they_were(
    tiny: dict[str, Path],
) -> None:
    source = Checkpoint(tiny["llama"])
    segment = SegmentRuntime(source, 0, 2)
    caches = [segment.new_cache(), segment.new_cache()]
    segment.forward(torch.randn(3, 64), caches[0], 0)
    segment.forward(torch.randn(5, 64), caches[1], 0)
    with pytest.raises(CacheMismatch, match="position 4"):
        segment.forward_batch(torch.randn(2, 64), caches, [3, 4])
    with pytest.raises(CacheMismatch, match="once"):
        segment.forward_batch(torch.randn(2, 64), [caches[0], caches[0]], [3, 3])
    with pytest.raises(CacheMismatch, match="one of each"):
        segment.forward_batch(torch.randn(3, 64), caches, [3, 5])
    assert [cache.length for cache in caches] == [3, 5]
    out = segment.forward_batch(torch.randn(2, 64), caches, [3, 5])
    assert out.shape == (2, 64) and [cache.length for cache in caches] == [4, 6]
