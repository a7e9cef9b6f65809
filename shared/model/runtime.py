"""Runtimes for the two roles a node plays: the trusted entry and a block segment.

``EntryRuntime`` holds what sits outside the blocks (embedding, final norm + head,
pooling); ``SegmentRuntime`` holds blocks ``[start, end)`` and loads only their
tensors. Both take tensors from any ``TensorSource``, check every name and shape
against the model family, and compute under ``torch.inference_mode()`` on one
sequence without a batch dimension: hidden states are ``[T, H]``; a batched decode step
(`SegmentRuntime.forward_batch`) stacks one new token of each of B requests as ``[B, H]``.
Weights and KV caches
live on the runtime's device; inputs may come from any device and results always come
back on the CPU (callers turn them into numpy arrays, wire frames and sampled tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Protocol, cast

import torch

from shared.errors import ConfigError, ContextTooLong, ModelError
from shared.model import bert, gpt2, llama
from shared.model.config import ModelConfig
from shared.model.kv_cache import BlockCache, CacheMismatch, SegmentCache
from shared.model.layers import check_tensors
from shared.model.quant import (
    QUANTISED,
    Weight,
    WeightPrecision,
    load_weights,
    precision_of,
    weight_bytes,
)
from shared.model.source import TensorSource

_Loaded = tuple[dict[str, torch.Tensor], dict[str, Weight]]
FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "llama": llama, "bert": bert}


class _Entry(Protocol):
    def embed(self, token_ids: torch.Tensor, start_position: int) -> torch.Tensor: ...
    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def pool(self, hidden: torch.Tensor) -> torch.Tensor: ...


class _Block(Protocol):
    linears: dict[str, Weight]

    def forward(
        self, x: torch.Tensor, kv: BlockCache | None, start_position: int
    ) -> torch.Tensor: ...


class _DecoderBlock(_Block, Protocol):
    def forward_batch(
        self, x: torch.Tensor, caches: Sequence[BlockCache], positions: Sequence[int]
    ) -> torch.Tensor: ...


_ENTRIES: dict[str, Callable[[ModelConfig, Mapping[str, torch.Tensor], Weight | None], _Entry]] = {
    "gpt2": gpt2.GPT2Entry,
    "llama": llama.LlamaEntry,
    "bert": bert.BertEntry,
}
_BLOCKS: dict[
    str, Callable[[ModelConfig, Mapping[str, torch.Tensor], Mapping[str, Weight]], _Block]
] = {
    "gpt2": gpt2.GPT2Block,
    "llama": llama.LlamaBlock,
    "bert": bert.BertBlock,
}


def weight_precision(source: TensorSource, requested: str | None, device: str) -> WeightPrecision:
    """The precision linear weights run at: ``requested`` (``--weights``), else what the
    source stores (a shard store's manifest; fp32 for a checkpoint folder). Raises
    ConfigError for an unknown name, or a quantised precision on a device other than the
    CPU (the int8 kernel is fbgemm's)."""
    stored = getattr(source, "weight_precision", "fp32")
    precision = precision_of(requested if requested is not None else str(stored))
    if torch.device(device).type != "cpu" and (precision in QUANTISED or stored in QUANTISED):
        raise ConfigError(f"{precision} weights run on the CPU only, not on {device}")
    return precision


class EntryRuntime:
    """The entry's part of the model: embedding in, logits or sentence embedding out.

    Embeddings and norms stay fp32 as stored; with int8 or int4 ``weights`` the head
    (the tied embedding's copy, or ``lm_head``) runs with the int8 kernel, with bf16 in
    bf16 (shared/model/quant.py).
    """

    def __init__(
        self, source: TensorSource, device: str = "cpu", weights: str | None = None,
        head_input_amax: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        self.config: ModelConfig = source.config
        self.device = torch.device(device)
        self.weights = weight_precision(source, weights, device)
        family = FAMILIES[self.config.architecture]
        shapes = family.entry_shapes(self.config)
        tensors = {
            name: tensor
            for name, tensor in source.entry_tensors().items()
            if not family.is_unused_entry(self.config, name)
        }
        check_tensors("entry", tensors, shapes)
        tensors = {name: tensor.to(self.device, torch.float32) for name, tensor in tensors.items()}
        head_name = family.head_source(self.config)
        head: Weight | None = None
        if head_name is not None and self.weights != "fp32":
            precision: WeightPrecision = "int8" if self.weights in QUANTISED else self.weights
            if head_input_amax is None:  # a quantised store's calibration (manifest)
                stored = getattr(source, "head_input_amax", None)
                head_input_amax = None if stored is None else torch.tensor(stored, dtype=torch.float32)
            amax = None if head_input_amax is None else {"head": head_input_amax}
            _, packed = load_weights("entry", {"head": tensors[head_name]}, {"head": False},
                                     {"head": shapes[head_name]}, precision, amax)  # fmt: skip
            head = packed["head"]
            if head_name == "lm_head.weight":  # its own head: the fp32 copy is not kept
                del tensors[head_name]
        self._entry = _ENTRIES[self.config.architecture](self.config, tensors, head)

    @property
    def head(self) -> Weight | None:
        """The output head's weight [V, H] (or its kernel); None for encoders."""
        return getattr(self._entry, "head", None)

    @head.setter
    def head(self, weight: Weight) -> None:
        self._entry.head = weight  # type: ignore[attr-defined]  # decoders only (calibration)

    def embed(self, token_ids: torch.Tensor, start_position: int) -> torch.Tensor:
        """[T] long token ids at positions ``start_position``.. -> [T, H].

        Raises ContextTooLong past ``max_positions``, ConfigError for ids outside the
        vocabulary.
        """
        end_position = start_position + int(token_ids.shape[0])
        if start_position < 0 or end_position > self.config.max_positions:
            raise ContextTooLong(
                f"positions {start_position}..{end_position - 1} exceed the model's "
                f"{self.config.max_positions}-token context"
            )
        if token_ids.numel() and (
            int(token_ids.min()) < 0 or int(token_ids.max()) >= self.config.vocab_size
        ):
            bad = [int(i) for i in token_ids if not 0 <= int(i) < self.config.vocab_size][0]
            raise ConfigError(
                f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})"
            )
        with torch.inference_mode():
            return self._entry.embed(token_ids.to(self.device, torch.long), start_position).cpu()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V] next-token logits (decoders; ModelError for encoders)."""
        with torch.inference_mode():
            return self._entry.logits(hidden.to(self.device)).cpu()

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [H] sentence embedding (BERT: mean + L2 norm; ModelError for decoders)."""
        with torch.inference_mode():
            return self._entry.pool(hidden.to(self.device)).cpu()


class SegmentRuntime:
    """Blocks ``[start, end)`` of a model, applied in order to a hidden state."""

    def __init__(
        self, source: TensorSource, start: int, end: int, device: str = "cpu",
        weights: str | None = None, input_amax: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:  # fmt: skip
        self.config: ModelConfig = source.config
        if not 0 <= start < end <= self.config.num_layers:
            raise ConfigError(
                f"segment [{start}, {end}) is not a non-empty range inside [0, {self.config.num_layers})"
            )
        self.start, self.end = start, end
        self.device = torch.device(device)
        self.weights = weight_precision(source, weights, device)
        family = FAMILIES[self.config.architecture]
        shapes = family.block_shapes(self.config)
        linear_names = family.linear_weights(self.config)
        groups = family.fused_linears(self.config)
        block_class = _BLOCKS[self.config.architecture]
        self._blocks: list[_Block] = []
        self.weight_bytes = 0
        """Bytes the loaded blocks' weights hold (tensors and quantised kernels)."""
        for index in range(start, end):
            where = f"block {index}"

            def load(stored: dict[str, torch.Tensor], where: str = where) -> _Loaded:
                amax = None if input_amax is None else input_amax.get(int(where.split()[1]))
                tensors, linears = load_weights(where, stored, linear_names, shapes, self.weights, amax, groups)
                check_tensors(where, {**tensors, **linears}, shapes)
                return (
                    {name: tensor.to(self.device) for name, tensor in tensors.items()},
                    {name: weight.to(self.device) if isinstance(weight, torch.Tensor) else weight
                     for name, weight in linears.items()},
                )  # fmt: skip

            cache = getattr(source, "loaded_block", None)  # a worker's shard cache
            if cache is not None and input_amax is None:
                tensors, linears = cache(index, self.weights, load)
            else:
                tensors, linears = load(source.block_tensors(index))
            self.weight_bytes += weight_bytes({**tensors, **linears})
            self._blocks.append(block_class(self.config, tensors, linears))

    def linear_layers(self) -> list[tuple[int, dict[str, Weight]]]:
        """(block index, its linear weights by name) for each block: the dicts the blocks
        use, so a calibration pass can wrap them (shared/model/calibrate.py)."""
        return [(index, block.linears) for index, block in enumerate(self._blocks, start=self.start)]

    def new_cache(self) -> SegmentCache:
        """An empty KV cache for this segment's blocks."""
        return SegmentCache(
            range(self.start, self.end), self.config.num_kv_heads, self.config.head_dim, self.device
        )

    def forward(
        self, hidden: torch.Tensor, cache: SegmentCache | None, start_position: int
    ) -> torch.Tensor:
        """[T, H] hidden states of tokens at ``start_position``.. -> [T, H].

        With a cache (decoders), the tokens attend to the cached ones and their K, V are
        appended; the cache must hold exactly ``start_position`` tokens (CacheMismatch
        otherwise). Without one, the T tokens attend only to each other. Encoders keep
        no cache and ignore it.
        """
        if cache is not None and not self.config.is_decoder:
            cache = None
        if cache is not None and cache.length != start_position:
            raise CacheMismatch(
                f"segment [{self.start}, {self.end}): cache holds {cache.length} tokens, "
                f"but the input starts at position {start_position}"
            )
        try:
            with torch.inference_mode():
                hidden = hidden.to(self.device, torch.float32)
                for index, block in enumerate(self._blocks, start=self.start):
                    kv = cache.block(index) if cache is not None else None
                    hidden = block.forward(hidden, kv, start_position)
                return hidden.cpu()
        except BaseException:
            if cache is not None:  # undo a half-applied step so the cache stays consistent
                cache.truncate(start_position)
            raise

    def forward_batch(
        self, hidden: torch.Tensor, caches: Sequence[SegmentCache], positions: Sequence[int]
    ) -> torch.Tensor:
        """One decode step of B requests at once: [B, H], row i the new token of the
        request whose cache is ``caches[i]``, at position ``positions[i]`` -> [B, H].

        Equal to B calls of `forward` with one row each (within float rounding: the
        linear layers see B rows). Each cache must hold exactly ``positions[i]`` tokens
        and appear once (CacheMismatch otherwise); ModelError for an encoder. On any
        failure every cache is truncated back to its position.
        """
        if not self.config.is_decoder:
            raise ModelError(f"{self.config.architecture} is an encoder: it has no decode steps")
        if hidden.shape[0] != len(caches) or len(caches) != len(positions):
            raise CacheMismatch(f"{hidden.shape[0]} rows, {len(caches)} caches and "
                                f"{len(positions)} positions: a batch needs one of each per request")  # fmt: skip
        if len({id(cache) for cache in caches}) != len(caches):
            raise CacheMismatch("a batched step holds each request's cache once")
        for cache, position in zip(caches, positions, strict=True):
            if cache.length != position:
                raise CacheMismatch(
                    f"segment [{self.start}, {self.end}): cache holds {cache.length} tokens, "
                    f"but the batched row starts at position {position}"
                )
        try:
            with torch.inference_mode():
                hidden = hidden.to(self.device, torch.float32)
                for index, block in enumerate(self._blocks, start=self.start):
                    decoder = cast(_DecoderBlock, block)
                    hidden = decoder.forward_batch(hidden, [c.block(index) for c in caches], positions)
                return hidden.cpu()
        except BaseException:
            for cache, position in zip(caches, positions, strict=True):
                cache.truncate(position)  # undo a half-applied step in every cache
            raise
