"""BERT encoders (Devlin et al., 2019), e.g. all-MiniLM-L6-v2 (sentence-transformers).

Word + absolute position + token-type (all zeros) embeddings, then LayerNorm; post-LN
blocks (``LN(x + Attn(x))``, ``LN(. + MLP(.))``) with bidirectional attention and a
gelu MLP. Sentence embedding: mean over tokens, then L2 normalisation.
Linear weights are ``[out, in]``. Shapes: T tokens, H hidden, I MLP width.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from shared.errors import ContextTooLong, ModelError
from shared.model.config import ModelConfig
from shared.model.kv_cache import BlockCache
from shared.model.layers import (
    activation_fn,
    attend,
    layer_norm,
    linear,
    linear_group,
    merge_heads,
    split_heads,
)
from shared.model.quant import Weight

Tensors = Mapping[str, torch.Tensor]
Linears = Mapping[str, Weight]  # linear weights: tensors or packed kernels (quant.py)
_UNUSED_ENTRY_PREFIXES = ("pooler.", "cls.")  # task heads sentence embeddings do not use


def entry_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical names and shapes of the embedding tensors."""
    hidden = config.hidden_size
    return {
        "embeddings.word_embeddings.weight": (config.vocab_size, hidden),
        "embeddings.position_embeddings.weight": (config.max_positions, hidden),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }


def is_unused_entry(config: ModelConfig, name: str) -> bool:
    """Pooler and pre-training heads are allowed in a checkpoint but not loaded."""
    return name.startswith(_UNUSED_ENTRY_PREFIXES)


def head_source(config: ModelConfig) -> str | None:
    """No next-token head: sentence embeddings are pooled hidden states."""
    return None


def linear_weights(config: ModelConfig) -> dict[str, bool]:
    """A block's linear weights (all stored [out, in])."""
    return {name: False for name in block_shapes(config)
            if name.endswith(".weight") and "LayerNorm" not in name}  # fmt: skip


def fused_linears(config: ModelConfig) -> tuple[tuple[str, ...], ...]:
    """Linear weights that read the same input (quantised: one kernel, quant_fusion.py)."""
    return (tuple(f"attention.self.{name}.weight" for name in ("query", "key", "value")),)


def block_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names (within ``encoder.layer.{i}``) and ``[out, in]`` shapes of one block."""
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    for name in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
    ):
        shapes |= {f"{name}.weight": (hidden, hidden), f"{name}.bias": (hidden,)}
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
        shapes |= {f"{norm}.weight": (hidden,), f"{norm}.bias": (hidden,)}
    shapes |= {
        "intermediate.dense.weight": (inner, hidden),
        "intermediate.dense.bias": (inner,),
        "output.dense.weight": (hidden, inner),
        "output.dense.bias": (hidden,),
    }
    return shapes


class BertEntry:
    """Embeddings (incl. their LayerNorm) in; mean pooling + L2 normalisation out."""

    def __init__(self, config: ModelConfig, tensors: Tensors, head: Weight | None) -> None:
        self.config = config
        self.w = dict(tensors)

    def embed(self, token_ids: torch.Tensor, start_position: int) -> torch.Tensor:
        """[T] token ids -> [T, H]. Raises ContextTooLong past max_positions."""
        w, end_position = self.w, start_position + token_ids.shape[0]
        if end_position > self.config.max_positions:
            raise ContextTooLong(
                f"{end_position} tokens exceed BERT's {self.config.max_positions} positions"
            )
        positions = torch.arange(start_position, end_position, device=token_ids.device)
        summed = (
            w["embeddings.word_embeddings.weight"][token_ids]
            + w["embeddings.position_embeddings.weight"][positions]
            + w["embeddings.token_type_embeddings.weight"][0]  # one segment: type 0
        )
        return layer_norm(
            summed,
            w["embeddings.LayerNorm.weight"],
            w["embeddings.LayerNorm.bias"],
            self.config.norm_eps,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Not defined: an encoder has no language-model head here."""
        raise ModelError("BERT is an encoder; it has no next-token head (use embed)")

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [H]: mean over tokens, then unit L2 norm (sentence-transformers)."""
        return F.normalize(hidden.mean(dim=0), p=2.0, dim=0)


class BertBlock:
    """LN(x + Attn(x)); then LN(. + MLP(.)). Bidirectional attention, no cache."""

    def __init__(self, config: ModelConfig, tensors: Tensors, linears: Linears) -> None:
        self.config = config
        self.activation = activation_fn(config.activation)
        self.w = dict(tensors)  # norms and biases
        self.linears = dict(linears)  # "attention.self.query.weight" ... [out, in]

    def forward(self, x: torch.Tensor, kv: BlockCache | None, start_position: int) -> torch.Tensor:
        """[T, H] -> [T, H]. ``kv`` and ``start_position`` are unused (no cache in encoders)."""
        eps = self.config.norm_eps
        x = self._norm(x + self._attention(x), "attention.output.LayerNorm", eps)
        inner = self.activation(self._linear(x, "intermediate.dense"))  # [T, I]
        return self._norm(x + self._linear(inner, "output.dense"), "output.LayerNorm", eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return linear(x, self.linears[f"{name}.weight"], self.w[f"{name}.bias"])

    def _norm(self, x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return layer_norm(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"], eps)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.config.num_heads
        names = [f"attention.self.{name}" for name in ("query", "key", "value")]
        query, key, value = (split_heads(y, heads) for y in linear_group(
            x, [self.linears[f"{n}.weight"] for n in names], [self.w[f"{n}.bias"] for n in names]))  # [heads, T, d]
        context = merge_heads(attend(query, key, value, causal=False))  # [T, H]
        return self._linear(context, "attention.output.dense")
