"""Convert a llama.cpp GGUF file of a Llama-family model into a Hugging Face folder.

The output is what ``LlamaForCausalLM`` reads: ``config.json`` (every hyper-parameter
taken from the GGUF metadata), ``model.safetensors`` (fp32, dequantized with the
``gguf`` package) and ``tokenizer.json`` (byte-level BPE rebuilt with ``tokenizers``
from the GGUF vocabulary and merges).

llama.cpp's converter permutes the rows of the q and k projections so that its rope
kernel can rotate adjacent pairs; Hugging Face rotates the two halves of each head.
``unpermute_qk`` undoes that permutation. Without it the model still runs but its
output quietly degrades.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from safetensors.numpy import save_file

from shared.errors import CheckpointError, UnsupportedArchitecture

Progress = Callable[[str], None]

# GGUF block-tensor suffix -> Hugging Face name within ``model.layers.{i}``.
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ENTRY_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_CONTROL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
# GPT-2's pre-tokenizer split (what tokenizers' ByteLevel uses with use_regex=True).
_DIGIT_SPLITTING_PRE_TYPES = ("smollm", "starcoder", "refact", "qwen2", "deepseek-coder")


def permute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (Hugging Face layout -> GGUF layout).

    ``weight`` has shape ``(heads * head_dim, in)``; within each head the rows of the
    two rotary halves are interleaved. Raises ValueError if the rows do not divide
    into ``heads`` heads of even size.
    """
    rows = weight.shape[0]
    if heads <= 0 or rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of even size")
    shaped = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return shaped.swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo ``permute_qk`` (GGUF layout -> Hugging Face layout). Raises ValueError
    if the rows do not divide into ``heads`` heads of even size."""
    rows = weight.shape[0]
    if heads <= 0 or rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of even size")
    shaped = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
    return shaped.swapaxes(1, 2).reshape(weight.shape)


def build_bpe_tokenizer(
    tokens: list[str],
    merges: list[str],
    special_ids: list[int],
    split_digits: bool = True,
) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer from a GGUF vocabulary (id order) and merge list.

    ``merges`` are ``"left right"`` strings; ``special_ids`` index ``tokens`` that are
    control tokens (matched whole, never split, skipped by ``decode``). With
    ``split_digits`` every digit becomes its own pre-token, as SmolLM2 does.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    merge_pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, separator, right = merge.partition(" ")
        if not separator:
            raise CheckpointError(f"BPE merge {merge!r} is not 'left right'")
        merge_pairs.append((left, right))
    model = tokenizers.models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False)
    tokenizer = tokenizers.Tokenizer(model)
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
            [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [tokenizers.AddedToken(tokens[index], special=True, normalized=False) for index in special_ids]
    )
    return tokenizer


class GgufLlama:
    """A read-only view of one Llama-family GGUF file.

    Raises CheckpointError if the file is not GGUF or lacks a required field, and
    UnsupportedArchitecture if ``general.architecture`` is not ``llama``.
    """

    def __init__(self, path: Path) -> None:
        import gguf  # heavy import, only needed while converting

        self._gguf = gguf
        self.path = path
        try:
            self._reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError) as error:
            raise CheckpointError(f"{path} is not a readable GGUF file: {error}") from None
        architecture = self.metadata("general.architecture")
        if architecture != "llama":
            raise UnsupportedArchitecture(f"{path}: GGUF architecture {architecture!r}; only llama converts")

    def metadata(self, key: str, default: Any = None) -> Any:
        """The value of metadata field ``key``; ``default`` when absent, CheckpointError
        when absent and no default is given."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is None:
                raise CheckpointError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        return field.contents()

    def hf_config(self) -> dict[str, Any]:
        """config.json contents for ``LlamaForCausalLM``, all values from the metadata."""
        hidden = int(self.metadata("llama.embedding_length"))
        heads = int(self.metadata("llama.attention.head_count"))
        tensor_names = {tensor.name for tensor in self._reader.tensors}
        pad = self._reader.fields.get("tokenizer.ggml.padding_token_id")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": int(self.metadata("llama.feed_forward_length")),
            "num_hidden_layers": int(self.metadata("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.metadata("llama.attention.head_count_kv", heads)),
            "head_dim": int(self.metadata("llama.rope.dimension_count", hidden // heads)),
            "max_position_embeddings": int(self.metadata("llama.context_length")),
            "rms_norm_eps": _float32_value(self.metadata("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": _float32_value(self.metadata("llama.rope.freq_base", 10000.0)),
            "vocab_size": len(self.metadata("tokenizer.ggml.tokens")),
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "bos_token_id": int(self.metadata("tokenizer.ggml.bos_token_id")),
            "eos_token_id": int(self.metadata("tokenizer.ggml.eos_token_id")),
            "pad_token_id": None if pad is None else int(pad.contents()),
            "rope_scaling": None,
            "torch_dtype": "float32",
            "use_cache": True,
        }

    def tokenizer(self) -> tokenizers.Tokenizer:
        """The rebuilt byte-level BPE tokenizer. Raises UnsupportedArchitecture for a
        tokenizer model other than GPT-2-style BPE."""
        model = self.metadata("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedArchitecture(f"{self.path}: GGUF tokenizer model {model!r} is not byte-level BPE")
        tokens = list(self.metadata("tokenizer.ggml.tokens"))
        types = list(self.metadata("tokenizer.ggml.token_type"))
        special_ids = [index for index, kind in enumerate(types) if kind == _CONTROL_TOKEN_TYPE]
        pre_type = self.metadata("tokenizer.ggml.pre", "default")
        return build_bpe_tokenizer(
            tokens,
            list(self.metadata("tokenizer.ggml.merges")),
            special_ids,
            split_digits=pre_type in _DIGIT_SPLITTING_PRE_TYPES,
        )

    def chat_template(self) -> str | None:
        """The Jinja chat template stored in the file, if any."""
        field = self._reader.fields.get("tokenizer.chat_template")
        return None if field is None else str(field.contents())

    def tensor_count(self) -> int:
        """Number of tensors in the file."""
        return len(self._reader.tensors)

    def hf_tensors(self, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
        """``(Hugging Face name, fp32 array)`` per tensor, dequantized, q/k un-permuted.

        Raises CheckpointError for a tensor name with no Hugging Face equivalent.
        """
        for tensor in self._reader.tensors:
            name = hf_tensor_name(tensor.name)
            array = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            array = np.ascontiguousarray(array, dtype=np.float32)
            if name.endswith("self_attn.q_proj.weight"):
                array = unpermute_qk(array, config["num_attention_heads"])
            elif name.endswith("self_attn.k_proj.weight"):
                array = unpermute_qk(array, config["num_key_value_heads"])
            yield name, np.ascontiguousarray(array)


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``.

    Raises CheckpointError for a name with no Hugging Face equivalent.
    """
    if gguf_name in _ENTRY_NAMES:
        return _ENTRY_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama equivalent")


def _float32_value(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    single = np.float32(value)
    for digits in range(6, 10):
        shortest = float(f"{single:.{digits}g}")
        if np.float32(shortest) == single:
            return shortest
    return float(single)


def convert_gguf_llama(gguf_path: Path, out_dir: Path, progress: Progress | None = None) -> None:
    """Write config.json, model.safetensors (fp32), tokenizer.json and
    tokenizer_config.json for ``gguf_path`` into the existing folder ``out_dir``.

    ``progress`` receives one line per group of tensors converted. Raises
    CheckpointError / UnsupportedArchitecture for files that do not convert.
    """
    report = progress or (lambda _line: None)
    source = GgufLlama(gguf_path)
    config = source.hf_config()
    tensors: dict[str, np.ndarray] = {}
    total = source.tensor_count()
    step = max(total // 10, 1)
    for done, (name, array) in enumerate(source.hf_tensors(config), start=1):
        if name in tensors:
            raise CheckpointError(f"{gguf_path}: tensor {name} appears twice")
        tensors[name] = array
        if done % step == 0 or done == total:
            report(f"dequantized {done}/{total} tensors ({100 * done // total}%)")
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if missing := expected - tensors.keys():
        raise CheckpointError(f"{gguf_path}: GGUF file lacks {sorted(missing)}")
    report("writing model.safetensors")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report("rebuilding tokenizer.json")
    source.tokenizer().save(str(out_dir / "tokenizer.json"))
    _write_tokenizer_config(source, config, out_dir)


def _write_tokenizer_config(source: GgufLlama, config: dict[str, Any], out_dir: Path) -> None:
    """tokenizer_config.json: special tokens and chat template, for tools that want them."""
    tokens = source.metadata("tokenizer.ggml.tokens")
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "add_bos_token": bool(source.metadata("tokenizer.ggml.add_bos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    if config["pad_token_id"] is not None:
        tokenizer_config["pad_token"] = tokens[config["pad_token_id"]]
    if (template := source.chat_template()) is not None:
        tokenizer_config["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
