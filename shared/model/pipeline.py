"""The whole model in one process, cut into the same segments the nodes would run.

``LocalPipeline`` chains an ``EntryRuntime`` and one ``SegmentRuntime`` per segment,
each decoder segment with its own KV cache, exactly as the distributed system does but
without a broker. It is the reference the distributed path is tested against, and the
``--local`` form of the command.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import ConfigError, ContextTooLong, ModelError
from shared.model.checkpoint import Checkpoint
from shared.model.config import ModelConfig
from shared.model.kv_cache import SegmentCache
from shared.model.quant import QUANTISED
from shared.model.runtime import EntryRuntime, SegmentRuntime
from shared.model.sampling import Sampler, SamplingParams, check_context, should_stop
from shared.model.source import TensorSource
from shared.model.tokenizer import TextTokenizer
from shared.tensor_frame import compress_activation, decompress_activation

GREEDY = SamplingParams()  # the default decoding: arg-max, no randomness


@dataclass(frozen=True)
class GenerationResult:
    """New tokens (prompt excluded) and timings in seconds.

    ttft_s: start of the request to the first new token; tpot_s: mean time per output
    token after the first (0.0 when only one token was produced).
    """

    token_ids: tuple[int, ...]
    ttft_s: float
    tpot_s: float


def segment_ranges(num_layers: int, splits: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open block ranges cut at ``splits``: (4, 12) with 16 layers ->
    [(0, 4), (4, 12), (12, 16)]. Raises ConfigError naming a bad split value."""
    previous = 0
    for split in splits:
        if isinstance(split, bool) or not isinstance(split, int):
            raise ConfigError(f"split {split!r} is not an integer block index")
        if not 0 < split < num_layers:
            raise ConfigError(
                f"split {split} is outside (0, {num_layers}): the model has {num_layers} blocks"
            )
        if split <= previous:
            raise ConfigError(
                f"split {split} does not come after {previous}: splits must strictly increase"
            )
        previous = split
    bounds = [0, *splits, num_layers]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class LocalPipeline:
    """Entry + segments of one model in this process.

    ``activation_precisions`` maps a block to the precision of the frames entering it
    (the layer count: the final hidden state), as a plan's ``link_precisions`` do.
    ``weights`` (fp32, bf16, int8, int4; default: as the source stores them) quantises
    the linear weights at load (shared/model/quant.py), int8 and int4 after one fp32
    calibration pass (shared/model/calibrate.py) that sets their SmoothQuant factors. Raises CheckpointError /
    UnsafeCheckpointError for a bad folder, ConfigError for bad splits or precision.
    """

    def __init__(
        self, model_dir: Path | str | TensorSource, splits: Sequence[int] = (), device: str = "cpu",
        weights: str | None = None, activation_precisions: Mapping[int, str] | None = None,
    ) -> None:  # fmt: skip
        source = model_dir if isinstance(model_dir, TensorSource) else Checkpoint(Path(model_dir))
        self.activation_precisions = dict(activation_precisions or {})
        self.source = source
        self.config: ModelConfig = source.config
        self.ranges = segment_ranges(self.config.num_layers, list(splits))
        ranges, head_amax = None, None
        stored = str(getattr(source, "weight_precision", "fp32"))
        if weights in QUANTISED and stored not in QUANTISED:  # calibrate, then quantise
            from shared.model.calibrate import input_ranges

            ranges, head_amax = input_ranges(LocalPipeline(source, (), device, "fp32"))
        self.entry = EntryRuntime(source, device, weights, head_amax)
        self.segments = [
            SegmentRuntime(source, start, end, device, weights, ranges) for start, end in self.ranges
        ]
        self._tokenizer: TextTokenizer | None = None

    @property
    def tokenizer(self) -> TextTokenizer:
        """The model's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer.from_file(self.source.tokenizer_path)
        return self._tokenizer

    def hidden_states(
        self, token_ids: torch.Tensor, caches: Sequence[SegmentCache] | None, start_position: int
    ) -> torch.Tensor:
        """Embed [T] token ids and run them through every segment -> [T, H]."""
        hidden = self.entry.embed(token_ids, start_position)
        for index, segment in enumerate(self.segments):
            hidden = self._hop(hidden, self.ranges[index][0])
            hidden = segment.forward(hidden, caches[index] if caches else None, start_position)
        return self._hop(hidden, self.config.num_layers)

    def _hop(self, hidden: torch.Tensor, target: int) -> torch.Tensor:
        """``hidden`` as a frame entering block ``target`` carries it: compressed to the
        precision ``activation_precisions`` names for that block and restored, row by row
        as the data plane does (unchanged where none is named, or fp32)."""
        precision = self.activation_precisions.get(target, "fp32")
        if precision == "fp32":
            return hidden
        values = hidden.detach().to("cpu", torch.float32).numpy()
        restored = decompress_activation(compress_activation(values, precision), values.shape[1])
        return torch.from_numpy(restored).to(hidden.device)

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams = GREEDY,
        on_token: Callable[[int], None] | None = None,
        stop_at_eos: bool = True,
        stop_token_ids: Sequence[int] | None = None,
    ) -> GenerationResult:
        """Prefill the prompt, then decode one token at a time with per-segment KV caches.

        ``on_token`` is called with each new id as soon as it is chosen. Stops after
        ``max_new_tokens`` or at an end-of-sequence id (``stop_token_ids``, default the
        config's eos ids) when ``stop_at_eos``. Raises ContextTooLong when
        ``len(prompt_ids) + max_new_tokens > max_positions``, ModelError for encoders,
        ConfigError for an empty prompt or ids outside the vocabulary.
        """
        if not self.config.is_decoder:
            raise ModelError(f"{self.config.architecture} is an encoder; use embed, not generate")
        check_context(len(prompt_ids), max_new_tokens, self.config.max_positions)
        stop_ids = self.config.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        sampler = Sampler(sampling)
        caches = [segment.new_cache() for segment in self.segments]
        started = time.perf_counter()
        tokens: list[int] = []
        step_input, position = list(prompt_ids), 0
        while True:
            hidden = self.hidden_states(
                torch.tensor(step_input, dtype=torch.long), caches, position
            )
            token = sampler.next_token(self.entry.logits(hidden[-1:])[0])
            tokens.append(token)
            if len(tokens) == 1:
                first_token_at = time.perf_counter()
            if on_token is not None:
                on_token(token)
            if should_stop(token, len(tokens), max_new_tokens, stop_ids, stop_at_eos):
                break
            position += len(step_input)
            step_input = [token]
        finished = time.perf_counter()
        tpot_s = (finished - first_token_at) / (len(tokens) - 1) if len(tokens) > 1 else 0.0
        return GenerationResult(tuple(tokens), first_token_at - started, tpot_s)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[T, V] logits of every position, one full pass without a cache."""
        return self.entry.logits(
            self.hidden_states(torch.tensor(token_ids, dtype=torch.long), None, 0)
        )

    def embed(self, token_ids: list[int]) -> list[float]:
        """Sentence embedding of ``token_ids`` (BERT: mean pooling + L2 norm), length H.

        Raises ContextTooLong past max_positions, ConfigError for an empty input,
        ModelError for decoders.
        """
        if not token_ids:
            raise ConfigError("nothing to embed: the input has no tokens")
        if len(token_ids) > self.config.max_positions:
            raise ContextTooLong(
                f"{len(token_ids)} tokens exceed the model's {self.config.max_positions}"
            )
        if self.config.is_decoder:
            raise ModelError(
                f"{self.config.architecture} is a decoder; embeddings need a BERT model"
            )
        hidden = self.hidden_states(torch.tensor(token_ids, dtype=torch.long), None, 0)
        return [float(value) for value in self.entry.pool(hidden)]
