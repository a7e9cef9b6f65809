"""Tiny random checkpoints in Hugging Face layout, for tests and demos.

``write_tiny_checkpoint`` writes config.json, model.safetensors (random fp32 weights,
hidden 64, 4 heads; Llama with 2 KV heads so grouped-query attention is exercised) and
a tokenizer.json built with ``tokenizers`` from a small in-code corpus: byte-level BPE
for GPT-2 and Llama, WordPiece with [CLS]/[SEP]/[UNK]/[PAD]/[MASK] for BERT. The same
arguments give byte-identical files. The end-of-sequence token is configured but its
head row is scaled down, so short greedy runs on random weights rarely stop early.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from shared.errors import ConfigError
from shared.model import bert, gpt2, llama
from shared.model.config import ModelConfig, load_config

HIDDEN, HEADS, KV_HEADS, INNER, POSITIONS = 64, 4, 2, 128, 256
_BPE_VOCAB, _WORDPIECE_VOCAB = 400, 300
_CORPUS = (
    "The capital of France is Paris. The capital of Germany is Berlin. "
    "Edge nodes split a transformer into segments of layers and pass activations along. "
    "A worker holds blocks from start to end; the entry node embeds tokens and samples. "
    "Bandwidth drops, nodes fail, and the split reviser moves the cut points at run time. "
    "Hello world! 0123456789 naïve café déjà vu — ünïcödé 日本語 ☃ 🚀 emoji test."
)


def write_tiny_checkpoint(
    architecture: str,
    out_dir: Path,
    layers: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Path:
    """Write a tiny random ``architecture`` ("gpt2" | "llama" | "bert") model to out_dir.

    ``tie_word_embeddings`` applies to the decoders (False writes its own lm_head).
    Returns ``out_dir``. Raises ConfigError for an unknown architecture or layers < 1.
    """
    if architecture not in ("gpt2", "llama", "bert"):
        raise ConfigError(
            f"no tiny model for architecture {architecture!r}; use gpt2, llama or bert"
        )
    if layers < 1:
        raise ConfigError(f"a tiny model needs at least one layer, got {layers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = (
        _wordpiece_tokenizer() if architecture == "bert" else _byte_bpe_tokenizer(architecture)
    )
    hf_config = _hf_config(architecture, layers, tokenizer, tie_word_embeddings)
    config = load_config(hf_config)
    tensors = _random_tensors(config, seed, hf_config)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir


def _byte_bpe_tokenizer(architecture: str) -> Tokenizer:
    specials = ["<|endoftext|>"] if architecture == "gpt2" else ["<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tokenizer


def _wordpiece_tokenizer() -> Tokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=_WORDPIECE_VOCAB, special_tokens=specials, show_progress=False
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def _hf_config(architecture: str, layers: int, tokenizer: Tokenizer, tied: bool) -> dict[str, Any]:
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if architecture == "gpt2":
        eos = tokenizer.token_to_id("<|endoftext|>")
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": vocab,
            "n_embd": HIDDEN,
            "n_head": HEADS,
            "n_layer": layers,
            "n_inner": INNER,
            "n_positions": POSITIONS,
            "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new",
            "bos_token_id": eos,
            "eos_token_id": eos,
            "tie_word_embeddings": tied,
            "dtype": "float32",
        }
    if architecture == "llama":
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab,
            "hidden_size": HIDDEN,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "num_hidden_layers": layers,
            "intermediate_size": INNER,
            "hidden_act": "silu",
            "max_position_embeddings": POSITIONS,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000.0,
            "bos_token_id": tokenizer.token_to_id("<s>"),
            "eos_token_id": tokenizer.token_to_id("</s>"),
            "tie_word_embeddings": tied,
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": "float32",
        }
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "intermediate_size": INNER,
        "hidden_act": "gelu",
        "max_position_embeddings": POSITIONS,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "dtype": "float32",
    }


def _random_tensors(
    config: ModelConfig, seed: int, hf_config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Random weights with HF names: linear ~ N(0, 1/fan_in), norms ~ 1, embeddings ~ N(0, 0.5)."""
    family = {"gpt2": gpt2, "llama": llama, "bert": bert}[config.architecture]
    prefix = {"gpt2": "transformer.", "llama": "model.", "bert": ""}[config.architecture]
    block_prefix = {"gpt2": "h", "llama": "layers", "bert": "encoder.layer"}[config.architecture]
    generator = torch.Generator().manual_seed(seed)
    shapes = {f"{prefix}{name}": shape for name, shape in family.entry_shapes(config).items()}
    if "lm_head.weight" in family.entry_shapes(config):
        shapes["lm_head.weight"] = shapes.pop(f"{prefix}lm_head.weight")
    for index in range(config.num_layers):
        for name, shape in family.block_shapes(config).items():
            shapes[f"{prefix}{block_prefix}.{index}.{name}"] = shape
    tensors = {name: _random_tensor(name, shape, generator) for name, shape in shapes.items()}
    _quiet_special_rows(config, tensors, prefix)
    return tensors


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        is_norm_weight = name.endswith("weight")  # 1-D weights are norm scales
        base = 1.0 if is_norm_weight else 0.0
        return base + 0.1 * torch.randn(shape, generator=generator)
    if "embed" in name or name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
        return 0.5 * torch.randn(shape, generator=generator)
    fan_in = shape[0] if ".h." in name else shape[1]  # GPT-2 Conv1D is [in, out]
    scaled: torch.Tensor = torch.randn(shape, generator=generator) / fan_in**0.5
    return scaled


def _quiet_special_rows(config: ModelConfig, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Shrink the head rows of bos/eos so greedy runs on random weights rarely pick them."""
    if not config.is_decoder:
        return
    head_name = (
        "lm_head.weight"
        if not config.tie_word_embeddings
        else (
            f"{prefix}wte.weight"
            if config.architecture == "gpt2"
            else f"{prefix}embed_tokens.weight"
        )
    )
    special = set(config.eos_token_ids)
    if config.bos_token_id is not None:
        special.add(config.bos_token_id)
    for token_id in sorted(special):
        tensors[head_name][token_id] *= 0.01
