"""The Llama family (Touvron et al., 2023): Llama, Mistral-style configs, SmolLM2.

Pre-RMSNorm blocks, rotary position embedding (RoPE, Su et al.) on queries and keys,
grouped-query attention (num_kv_heads <= num_heads), SwiGLU MLP
``down(silu(gate(x)) * up(x))``, final RMSNorm and a head that is either its own
``lm_head.weight`` or the token embedding (tied). Linear weights are ``[out, in]``.
Shapes: T tokens, H hidden, V vocabulary, nh / nkv heads, d head_dim, I MLP width.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from shared.errors import ModelError
from shared.model.config import ModelConfig
from shared.model.kv_cache import BlockCache
from shared.model.layers import (
    activation_fn,
    attend,
    attend_each,
    linear,
    linear_group,
    merge_heads,
    rms_norm,
    split_heads,
)
from shared.model.quant import Weight

Tensors = Mapping[str, torch.Tensor]
Linears = Mapping[str, Weight]  # linear weights: tensors or packed kernels (quant.py)


def entry_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical names and shapes of the tensors outside the blocks."""
    shapes = {
        "embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "norm.weight": (config.hidden_size,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def is_unused_entry(config: ModelConfig, name: str) -> bool:
    """Entry tensors a checkpoint may carry that are not loaded (a tied head's copy)."""
    return name == "lm_head.weight" and config.tie_word_embeddings


def head_source(config: ModelConfig) -> str | None:
    """The entry tensor the output head multiplies by ([V, H])."""
    return "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"


def linear_weights(config: ModelConfig) -> dict[str, bool]:
    """A block's linear weights (all stored [out, in]: False = not transposed)."""
    return {name: False for name in block_shapes(config) if name.endswith("proj.weight")}


def fused_linears(config: ModelConfig) -> tuple[tuple[str, ...], ...]:
    """Linear weights that read the same input, in output order: quantised, each group
    runs as one kernel (shared/model/quant_fusion.py)."""
    return (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    )


def block_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names (within a block) and ``[out, in]`` shapes of one block's tensors."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_width, hidden),
        "self_attn.k_proj.weight": (kv_width, hidden),
        "self_attn.v_proj.weight": (kv_width, hidden),
        "self_attn.o_proj.weight": (hidden, q_width),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inner, hidden),
        "mlp.up_proj.weight": (inner, hidden),
        "mlp.down_proj.weight": (hidden, inner),
    }
    if config.attention_bias:
        shapes |= {
            "self_attn.q_proj.bias": (q_width,),
            "self_attn.k_proj.bias": (kv_width,),
            "self_attn.v_proj.bias": (kv_width,),
            "self_attn.o_proj.bias": (hidden,),
        }
    if config.mlp_bias:
        shapes |= {
            "mlp.gate_proj.bias": (inner,),
            "mlp.up_proj.bias": (inner,),
            "mlp.down_proj.bias": (hidden,),
        }
    return shapes


def rotary_tables(
    config: ModelConfig, start_position: int, count: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (``_angles``) for positions start_position .. + count, each
    [count, d]. Every block of a step asks for the same tables: they are computed once
    (read-only, shared)."""
    return _rotary_tables(config.rope_theta, config.head_dim, start_position, count, str(device))


@functools.lru_cache(maxsize=4)
def _rotary_tables(
    theta: float, head_dim: int, start_position: int, count: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(
        start_position, start_position + count, dtype=torch.float32, device=device
    )
    return _angles(theta, head_dim, positions)


def rotary_rows(
    config: ModelConfig, positions: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (``_angles``) for the given positions, one row each ([B, d]):
    a batched decode step, whose rows are different requests at their own positions.
    Every block of a step asks for the same rows: they are computed once (read-only,
    shared; a worker's single-stream step spent 6 % of its time here before)."""
    return _rotary_rows(config.rope_theta, config.head_dim, tuple(positions), str(device))


@functools.lru_cache(maxsize=4)
def _rotary_rows(
    theta: float, head_dim: int, positions: tuple[int, ...], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor(positions, dtype=torch.float32, device=device)
    return _angles(theta, head_dim, rows)


def _angles(theta: float, head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [T, d] of the rotation angles at ``positions`` [T] (float32):
    the sin of the first half negated (``apply_rotary``)."""
    half = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inverse_frequency = 1.0 / (theta**half)  # [d/2]
    angles = torch.outer(positions, inverse_frequency)  # [T, d/2]
    sin = angles.sin()
    angles = torch.cat((angles, angles), dim=-1)  # [T, d]: halves rotate together
    return angles.cos(), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate [heads, T, d] by the position angles (rotate-half convention:
    ``x cos + cat(-x2, x1) sin``; the sign is in ``signed_sin``, so the halves swap
    with one roll)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class LlamaEntry:
    """Token embedding in; final RMSNorm + head out. ``head`` is ``head_source``'s
    tensor [V, H] (the embedding when tied), or its quantised kernel (runtime.py)."""

    def __init__(self, config: ModelConfig, tensors: Tensors, head: Weight | None) -> None:
        self.config = config
        self.token_embedding = tensors["embed_tokens.weight"]  # [V, H]
        self.final_norm = tensors["norm.weight"]  # [H]
        self.head = head if head is not None else tensors[head_source(config) or ""]

    def embed(self, token_ids: torch.Tensor, start_position: int) -> torch.Tensor:
        """[T] token ids -> [T, H]; positions enter later, through RoPE in each block."""
        return self.token_embedding[token_ids]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, V] next-token logits."""
        return linear(rms_norm(hidden, self.final_norm, self.config.norm_eps), self.head)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Not defined for a causal language model."""
        raise ModelError("Llama is a decoder; sentence embeddings need a BERT model")


class LlamaBlock:
    """x + Attn(RMSNorm(x)); then + SwiGLU(RMSNorm(.)). Causal GQA with RoPE."""

    def __init__(self, config: ModelConfig, tensors: Tensors, linears: Linears) -> None:
        self.config = config
        self.activation = activation_fn(config.activation)
        self.w = dict(tensors)  # norms and biases
        self.linears = dict(linears)  # "self_attn.q_proj.weight" ... [out, in]

    def forward(self, x: torch.Tensor, kv: BlockCache | None, start_position: int) -> torch.Tensor:
        """[T, H] at positions start_position.. -> [T, H]; appends K, V to ``kv``."""
        w, eps = self.w, self.config.norm_eps
        x = x + self._attention(rms_norm(x, w["input_layernorm.weight"], eps), kv, start_position)
        return x + self._mlp(rms_norm(x, w["post_attention_layernorm.weight"], eps))

    def forward_batch(
        self, x: torch.Tensor, caches: Sequence[BlockCache], positions: Sequence[int]
    ) -> torch.Tensor:
        """A decode step of B requests: [B, H], row i request i's new token at
        ``positions[i]``, its K, V appended to ``caches[i]`` -> [B, H]. Norms, projections
        and the MLP run once on the stacked rows; attention per request (`attend_each`)."""
        w, eps = self.w, self.config.norm_eps
        x = x + self._attention_batch(rms_norm(x, w["input_layernorm.weight"], eps), caches, positions)
        return x + self._mlp(rms_norm(x, w["post_attention_layernorm.weight"], eps))

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return linear(x, self.linears[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def _linears(self, x: torch.Tensor, *names: str) -> list[torch.Tensor]:
        """Linears that read the same ``x`` (one call when their kernel is fused)."""
        return linear_group(x, [self.linears[f"{name}.weight"] for name in names],
                            [self.w.get(f"{name}.bias") for name in names])  # fmt: skip

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query [nh, T, d], key and value [nkv, T, d] of [T, H] rows, before RoPE."""
        config = self.config
        query, key, value = self._linears(x, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        return (split_heads(query, config.num_heads), split_heads(key, config.num_kv_heads),
                split_heads(value, config.num_kv_heads))  # fmt: skip

    def _attention(
        self, x: torch.Tensor, kv: BlockCache | None, start_position: int
    ) -> torch.Tensor:
        query, key, value = self._projections(x)
        cos, sin = rotary_tables(self.config, start_position, x.shape[0], x.device)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if kv is not None:
            key, value = kv.append(key, value)  # [nkv, past + T, d]
        context = merge_heads(attend(query, key, value, causal=True))  # [T, nh * d]
        return self._linear(context, "self_attn.o_proj")  # [T, H]

    def _attention_batch(
        self, x: torch.Tensor, caches: Sequence[BlockCache], positions: Sequence[int]
    ) -> torch.Tensor:
        query, key, value = self._projections(x)  # one row per request
        cos, sin = rotary_rows(self.config, positions, x.device)  # [B, d]
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        context = merge_heads(attend_each(query, key, value, caches))  # [B, nh * d]
        return self._linear(context, "self_attn.o_proj")  # [B, H]

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._linears(x, "mlp.gate_proj", "mlp.up_proj")  # [T, I] each
        return self._linear(self.activation(gate) * up, "mlp.down_proj")  # [T, H]
