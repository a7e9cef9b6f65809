"""The two packaged models, prepared from their PyPI packages and run split (slow tier).

SmolLM2 is converted from GGUF (about 6 s) into a temporary folder, so these tests
exercise the conversion itself; MiniLM is copied. transformers is the reference here
and only here.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from shared.model.pipeline import LocalPipeline
from shared.model.prepare import MARKER_FILE, prepare_model
from shared.model.shard import ShardStore, write_shards
from shared.model.tokenizer import TextTokenizer

pytestmark = pytest.mark.slow

CAPITALS = "The capital of France is Paris. The capital of Germany is"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    started = time.perf_counter()
    folder = prepare_model("smollm2", out_dir=tmp_path_factory.mktemp("models") / "smollm2")
    print(f"SmolLM2 conversion took {time.perf_counter() - started:.1f} s")
    return folder


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_model("minilm", out_dir=tmp_path_factory.mktemp("models") / "minilm")


def test_second_prepare_is_instant(smollm2: Path) -> None:
    assert (smollm2 / MARKER_FILE).is_file()
    started = time.perf_counter()
    assert prepare_model("smollm2", out_dir=smollm2) == smollm2
    assert time.perf_counter() - started < 0.5


def test_smollm2_continues_with_berlin_split_three_ways(smollm2: Path, tmp_path: Path) -> None:
    tokenizer = TextTokenizer.from_file(smollm2 / "tokenizer.json")
    prompt = tokenizer.encode(CAPITALS)
    unsplit = LocalPipeline(smollm2).generate(prompt, 8).token_ids
    assert tokenizer.decode(unsplit).startswith(" Berlin")
    assert LocalPipeline(smollm2, splits=(10, 20)).generate(prompt, 8).token_ids == unsplit
    write_shards(smollm2, tmp_path / "store")
    from_shards = LocalPipeline(ShardStore(tmp_path / "store"), splits=(7, 19))
    assert from_shards.generate(prompt, 8).token_ids == unsplit


def test_smollm2_matches_transformers(smollm2: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = TextTokenizer.from_file(smollm2 / "tokenizer.json")
    prompt = tokenizer.encode(CAPITALS)
    reference = transformers.LlamaForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
        expected_tokens = reference.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=2
        )[0, len(prompt):].tolist()
    ours = LocalPipeline(smollm2, splits=(15,))
    torch.testing.assert_close(ours.logits(prompt), expected, atol=2e-4, rtol=0)  # measured 5e-5
    assert list(ours.generate(prompt, 6, stop_at_eos=False).token_ids) == expected_tokens


def test_smollm2_tokenizer(smollm2: Path) -> None:
    tokenizer = TextTokenizer.from_file(smollm2 / "tokenizer.json")
    sample = "Edge nodes in 2024 ran naïve café code:\n\tprint('héllo 🚀')  <|im_start|>user\n"
    assert tokenizer.decode(tokenizer.encode(sample), skip_special_tokens=False) == sample
    for word in ("The", " capital", " Paris", " Berlin", " Germany", " the"):
        assert len(tokenizer.encode(word)) == 1, word
    assert len(tokenizer.encode("2024")) == 4  # digits are split one by one
    chat = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>")  # control tokens stay whole
    assert (chat[0], chat[-1]) == (1, 2)
    assert tokenizer.decode(chat) == "assistant\nHi"


def test_minilm_split_embeddings_match_unsplit_and_transformers(minilm: Path) -> None:
    transformers = pytest.importorskip("transformers")
    text = "Edge computers split a transformer into segments of layers."
    token_ids = TextTokenizer.from_file(minilm / "tokenizer.json").encode(text)
    unsplit = torch.tensor(LocalPipeline(minilm).embed(token_ids))
    split = torch.tensor(LocalPipeline(minilm, splits=(2, 4)).embed(token_ids))
    torch.testing.assert_close(split, unsplit, atol=1e-5, rtol=0)
    reference_model = transformers.BertModel.from_pretrained(str(minilm), add_pooling_layer=False).eval()
    with torch.inference_mode():
        hidden = reference_model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]
    reference = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
    torch.testing.assert_close(split, reference, atol=1e-5, rtol=0)
    assert abs(float(split.norm()) - 1.0) < 1e-5
