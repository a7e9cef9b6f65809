"""GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").

Learned absolute positions, pre-LayerNorm blocks, fused QKV projection, gelu_new MLP,
final LayerNorm ``ln_f`` and a head tied to the token embedding. Weights keep the
checkpoint's Conv1D layout ``[in, out]``, so projections are ``x @ W + b``.
Shapes: T tokens, H hidden, V vocabulary, P positions, I MLP width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from shared.errors import ContextTooLong, ModelError
from shared.model.config import ModelConfig
from shared.model.kv_cache import BlockCache
from shared.model.layers import (
    activation_fn,
    attend,
    attend_each,
    conv1d,
    layer_norm,
    linear,
    merge_heads,
    split_heads,
)
from shared.model.quant import Weight

Tensors = Mapping[str, torch.Tensor]
Linears = Mapping[str, Weight]  # linear weights: tensors or packed kernels (quant.py)


def entry_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical names and shapes of the tensors outside the blocks."""
    hidden = config.hidden_size
    shapes = {
        "wte.weight": (config.vocab_size, hidden),
        "wpe.weight": (config.max_positions, hidden),
        "ln_f.weight": (hidden,),
        "ln_f.bias": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def is_unused_entry(config: ModelConfig, name: str) -> bool:
    """Entry tensors a checkpoint may carry that are not loaded (a tied head's copy)."""
    return name == "lm_head.weight" and config.tie_word_embeddings


def head_source(config: ModelConfig) -> str | None:
    """The entry tensor the output head multiplies by ([V, H])."""
    return "wte.weight" if config.tie_word_embeddings else "lm_head.weight"


def linear_weights(config: ModelConfig) -> dict[str, bool]:
    """A block's linear weights; True: stored [in, out] (Conv1D)."""
    return {name: True for name in ("attn.c_attn.weight", "attn.c_proj.weight",
                                    "mlp.c_fc.weight", "mlp.c_proj.weight")}  # fmt: skip


def fused_linears(config: ModelConfig) -> tuple[tuple[str, ...], ...]:
    """None: GPT-2 stores query, key and value as one weight already (c_attn)."""
    return ()


def block_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names (within a block) and Conv1D shapes ``[in, out]`` of one block's tensors."""
    hidden, inner = config.hidden_size, config.intermediate_size
    return {
        "ln_1.weight": (hidden,),
        "ln_1.bias": (hidden,),
        "attn.c_attn.weight": (hidden, 3 * hidden),
        "attn.c_attn.bias": (3 * hidden,),
        "attn.c_proj.weight": (hidden, hidden),
        "attn.c_proj.bias": (hidden,),
        "ln_2.weight": (hidden,),
        "ln_2.bias": (hidden,),
        "mlp.c_fc.weight": (hidden, inner),
        "mlp.c_fc.bias": (inner,),
        "mlp.c_proj.weight": (inner, hidden),
        "mlp.c_proj.bias": (hidden,),
    }


class GPT2Entry:
    """Token + position embedding in; final LayerNorm + tied head out."""

    def __init__(self, config: ModelConfig, tensors: Tensors, head: Weight | None) -> None:
        self.config = config
        self.token_embedding = tensors["wte.weight"]  # [V, H]
        self.position_embedding = tensors["wpe.weight"]  # [P, H]
        self.final_norm = (tensors["ln_f.weight"], tensors["ln_f.bias"])  # [H], [H]
        # [V, H]: head_source's tensor (wte when tied), or its quantised kernel (runtime.py)
        self.head = head if head is not None else tensors[head_source(config) or ""]

    def embed(self, token_ids: torch.Tensor, start_position: int) -> torch.Tensor:
        """[T] token ids at positions start_position.. -> [T, H]. Raises ContextTooLong."""
        end_position = start_position + token_ids.shape[0]
        if end_position > self.config.max_positions:
            raise ContextTooLong(
                f"position {end_position - 1} is past GPT-2's {self.config.max_positions}"
            )
        positions = torch.arange(start_position, end_position, device=token_ids.device)
        return self.token_embedding[token_ids] + self.position_embedding[positions]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V] next-token logits."""
        return linear(layer_norm(hidden, *self.final_norm, self.config.norm_eps), self.head)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Not defined for a causal language model."""
        raise ModelError("GPT-2 is a decoder; sentence embeddings need a BERT model")


class GPT2Block:
    """x + Attn(LN(x)); then + MLP(LN(.)). Causal multi-head attention."""

    def __init__(self, config: ModelConfig, tensors: Tensors, linears: Linears) -> None:
        self.config = config
        self.activation = activation_fn(config.activation)
        self.w = dict(tensors)  # norms and biases
        self.linears = dict(linears)  # Conv1D weights [in, out] (or packed kernels)

    def forward(self, x: torch.Tensor, kv: BlockCache | None, start_position: int) -> torch.Tensor:
        """[T, H] -> [T, H]; appends this block's K, V for the T tokens to ``kv``."""
        w, eps = self.w, self.config.norm_eps
        x = x + self._attention(layer_norm(x, w["ln_1.weight"], w["ln_1.bias"], eps), kv)
        return x + self._mlp(layer_norm(x, w["ln_2.weight"], w["ln_2.bias"], eps))

    def forward_batch(
        self, x: torch.Tensor, caches: Sequence[BlockCache], positions: Sequence[int]
    ) -> torch.Tensor:
        """A decode step of B requests: [B, H], row i request i's new token (its position
        is already in the embedding), its K, V appended to ``caches[i]`` -> [B, H]. Norms,
        projections and the MLP run once on the stacked rows; attention per request."""
        w, eps = self.w, self.config.norm_eps
        query, key, value = self._projections(layer_norm(x, w["ln_1.weight"], w["ln_1.bias"], eps))
        context = merge_heads(attend_each(query, key, value, caches))  # [B, H]
        x = x + conv1d(context, self.linears["attn.c_proj.weight"], w["attn.c_proj.bias"])
        return x + self._mlp(layer_norm(x, w["ln_2.weight"], w["ln_2.bias"], eps))

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Query, key, value [heads, T, head_dim] of [T, H] rows (one fused Conv1D)."""
        qkv = conv1d(x, self.linears["attn.c_attn.weight"], self.w["attn.c_attn.bias"])  # [T, 3H]
        heads = self.config.num_heads
        return tuple(split_heads(part, heads) for part in torch.split(qkv, self.config.hidden_size, dim=-1))

    def _attention(self, x: torch.Tensor, kv: BlockCache | None) -> torch.Tensor:
        query, key, value = self._projections(x)
        if kv is not None:
            key, value = kv.append(key, value)  # [heads, past + T, head_dim]
        context = merge_heads(attend(query, key, value, causal=True))  # [T, H]
        return conv1d(context, self.linears["attn.c_proj.weight"], self.w["attn.c_proj.bias"])

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        inner = self.activation(conv1d(x, self.linears["mlp.c_fc.weight"], w["mlp.c_fc.bias"]))  # [T, I]
        return conv1d(inner, self.linears["mlp.c_proj.weight"], w["mlp.c_proj.bias"])  # [T, H]
