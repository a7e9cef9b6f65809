"""Model hyper-parameters read from a Hugging Face ``config.json``.

One frozen ``ModelConfig`` describes the three families edgesplit runs: GPT-2, the
Llama family (Llama, Mistral-style configs, SmolLM2) and BERT encoders. The cost
helpers (bytes and FLOPs per token) feed the planner; they assume fp32 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import CheckpointError, UnsupportedArchitecture

FP32_BYTES = 4
ARCHITECTURES = ("gpt2", "llama", "bert")
_LLAMA_MODEL_TYPES = ("llama", "mistral")
_ARCHITECTURE_CLASS_PREFIXES = {
    "GPT2": "gpt2",
    "Llama": "llama",
    "Mistral": "llama",
    "Bert": "bert",
}
_ACTIVATIONS = ("gelu_new", "gelu", "silu", "relu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one checkpoint (fp32 at run time)."""

    architecture: str  # "gpt2" | "llama" | "bert"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    activation: str = "gelu_new"  # MLP non-linearity (llama: gate activation)
    type_vocab_size: int = 0  # BERT token-type embeddings; 0 elsewhere
    attention_bias: bool = False  # llama: biases on q/k/v/o projections
    mlp_bias: bool = False  # llama: biases on gate/up/down projections
    pad_token_id: int | None = None

    @property
    def is_decoder(self) -> bool:
        """True for causal language models (GPT-2, Llama); False for BERT encoders."""
        return self.architecture != "bert"

    def activation_bytes_per_token(self) -> int:
        """Bytes of one token's fp32 hidden state (what crosses a split point)."""
        return self.hidden_size * FP32_BYTES

    def kv_bytes_per_token_per_block(self) -> int:
        """Bytes of fp32 K plus V cached per token in one block; 0 for encoders."""
        if not self.is_decoder:
            return 0
        return 2 * self.num_kv_heads * self.head_dim * FP32_BYTES

    def block_parameter_count(self) -> int:
        """Weights (and biases) in one transformer block."""
        hidden, inner = self.hidden_size, self.intermediate_size
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        attention = hidden * (q_width + 2 * kv_width) + q_width * hidden
        if self.architecture == "llama":
            mlp = 3 * hidden * inner
            norms = 2 * hidden
            biases = (q_width + 2 * kv_width + hidden) * self.attention_bias
            biases += (2 * inner + hidden) * self.mlp_bias
        else:
            mlp = 2 * hidden * inner
            norms = 4 * hidden
            biases = q_width + 2 * kv_width + hidden + inner + hidden
        return attention + mlp + norms + biases

    def block_bytes(self) -> int:
        """Bytes of one block's fp32 weights."""
        return self.block_parameter_count() * FP32_BYTES

    def flops_per_token_per_block(self, context_tokens: int = 0) -> float:
        """Approximate FLOPs for one token through one block.

        ``2 * parameters`` for the matrix products plus ``4 * heads * head_dim *
        context_tokens`` for the scores (QK^T) and the weighted sum (AV) over the
        ``context_tokens`` the token attends to.
        """
        attention = 4.0 * self.num_heads * self.head_dim * max(context_tokens, 0)
        return 2.0 * self.block_parameter_count() + attention

    def head_flops_per_token(self) -> float:
        """FLOPs of the language-model head for one token (0 for encoders)."""
        return 2.0 * self.hidden_size * self.vocab_size if self.is_decoder else 0.0


def detect_architecture(hf_config: Mapping[str, Any]) -> str:
    """The family of a config.json: ``"gpt2"``, ``"llama"`` or ``"bert"``.

    Raises UnsupportedArchitecture when neither ``model_type`` nor ``architectures``
    names a supported family.
    """
    model_type = str(hf_config.get("model_type", "")).lower()
    if model_type in ("gpt2", "bert"):
        return model_type
    if model_type in _LLAMA_MODEL_TYPES:
        return "llama"
    for class_name in hf_config.get("architectures") or ():
        for prefix, family in _ARCHITECTURE_CLASS_PREFIXES.items():
            if str(class_name).startswith(prefix) and not model_type:
                return family
    names = hf_config.get("architectures") or []
    raise UnsupportedArchitecture(
        f"config.json model_type {model_type!r} (architectures {names}) is not supported; "
        f"edgesplit runs gpt2, llama/mistral and bert models"
    )


def load_config(hf_config: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the parsed contents of a Hugging Face config.json.

    Raises UnsupportedArchitecture for unknown families or features (rope scaling,
    relative positions), CheckpointError for missing or invalid fields.
    """
    if not isinstance(hf_config, Mapping):
        raise CheckpointError("config.json must hold a JSON object")
    architecture = detect_architecture(hf_config)
    readers = {"gpt2": _gpt2_config, "llama": _llama_config, "bert": _bert_config}
    try:
        config = readers[architecture](hf_config)
    except (KeyError, TypeError, ValueError, ArithmeticError) as error:  # e.g. float(10**400)
        raise CheckpointError(
            f"config.json for {architecture} has a missing or bad field: {error}"
        ) from None
    _validate(config)
    return config


def _int(hf: Mapping[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        if hf.get(key) is not None:
            value = hf[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
            return value
    if default is None:
        raise KeyError(keys[0])
    return default


def _token_id(value: Any) -> int:
    """A token id must be a JSON integer (``int(1e400)`` would raise OverflowError,
    ``int(1.5)`` silently truncate)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"token ids must be integers, got {value!r}")
    return value


def _optional_id(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):
        return _token_id(value[0]) if value else None
    return _token_id(value)


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(_token_id(item) for item in value)
    return (_token_id(value),)


def _per_head(hidden: int, heads: int) -> int:
    """hidden // heads, or 0 (refused by ``_validate``) when heads is not positive."""
    return hidden // heads if heads > 0 else 0


def _gpt2_config(hf: Mapping[str, Any]) -> ModelConfig:
    hidden = _int(hf, "n_embd", "hidden_size")
    heads = _int(hf, "n_head", "num_attention_heads")
    return ModelConfig(
        architecture="gpt2",
        vocab_size=_int(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(hf, "n_layer", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_per_head(hidden, heads),
        intermediate_size=_int(hf, "n_inner", default=4 * hidden),
        max_positions=_int(hf, "n_positions", "max_position_embeddings"),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        rope_theta=0.0,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=_optional_id(hf.get("bos_token_id")),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        activation=str(hf.get("activation_function", "gelu_new")),
        pad_token_id=_optional_id(hf.get("pad_token_id")),
    )


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """Rope base; refuses rope scaling variants (not implemented)."""
    parameters = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or parameters
    if not isinstance(parameters, Mapping) or not isinstance(scaling, Mapping):
        raise ValueError("rope_scaling and rope_parameters must be JSON objects")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", None):
        raise UnsupportedArchitecture(f"rope scaling {rope_type!r} is not supported")
    return float(hf.get("rope_theta", parameters.get("rope_theta", 10000.0)))


def _llama_config(hf: Mapping[str, Any]) -> ModelConfig:
    hidden = _int(hf, "hidden_size")
    heads = _int(hf, "num_attention_heads")
    max_positions = _int(hf, "max_position_embeddings")
    sliding_window = hf.get("sliding_window")
    if isinstance(sliding_window, int) and 0 < sliding_window < max_positions:
        max_positions = sliding_window  # within the window, sliding attention is plain attention
    return ModelConfig(
        architecture="llama",
        vocab_size=_int(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=_int(hf, "num_key_value_heads", default=heads),
        head_dim=_int(hf, "head_dim", default=_per_head(hidden, heads)),
        intermediate_size=_int(hf, "intermediate_size"),
        max_positions=max_positions,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=_optional_id(hf.get("bos_token_id")),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        activation=str(hf.get("hidden_act", "silu")),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        pad_token_id=_optional_id(hf.get("pad_token_id")),
    )


def _bert_config(hf: Mapping[str, Any]) -> ModelConfig:
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise UnsupportedArchitecture(
            f"BERT position_embedding_type {position_type!r} is not supported"
        )
    hidden = _int(hf, "hidden_size")
    heads = _int(hf, "num_attention_heads")
    return ModelConfig(
        architecture="bert",
        vocab_size=_int(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=_int(hf, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=_per_head(hidden, heads),
        intermediate_size=_int(hf, "intermediate_size"),
        max_positions=_int(hf, "max_position_embeddings"),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        rope_theta=0.0,
        tie_word_embeddings=False,
        bos_token_id=_optional_id(hf.get("bos_token_id")),
        eos_token_ids=(),
        activation=str(hf.get("hidden_act", "gelu")),
        type_vocab_size=_int(hf, "type_vocab_size", default=2),
        pad_token_id=_optional_id(hf.get("pad_token_id")),
    )


def _validate(config: ModelConfig) -> None:
    positive = (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "intermediate_size",
        "max_positions",
    )
    for field in positive:
        if getattr(config, field) <= 0:
            raise CheckpointError(
                f"config.json: {field} must be positive, got {getattr(config, field)}"
            )
    if not (math.isfinite(config.norm_eps) and config.norm_eps > 0):
        raise CheckpointError(f"config.json: the norm epsilon must be a finite number > 0, got {config.norm_eps}")
    if not (math.isfinite(config.rope_theta) and config.rope_theta >= 0) or (
        config.architecture == "llama" and config.rope_theta == 0
    ):
        raise CheckpointError(f"config.json: rope_theta must be a finite number > 0, got {config.rope_theta}")
    if config.num_heads % config.num_kv_heads:
        raise CheckpointError(
            f"config.json: num_attention_heads {config.num_heads} is not a multiple of "
            f"num_key_value_heads {config.num_kv_heads}"
        )
    if config.architecture != "llama" and config.head_dim * config.num_heads != config.hidden_size:
        raise CheckpointError(
            f"config.json: hidden size {config.hidden_size} is not divisible by {config.num_heads} heads"
        )
    if config.activation not in _ACTIVATIONS:
        raise UnsupportedArchitecture(f"activation {config.activation!r} is not supported")
    if config.architecture == "llama" and config.head_dim % 2:
        raise CheckpointError(f"config.json: rotary head_dim {config.head_dim} must be even")
