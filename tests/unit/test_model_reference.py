"""The hand-written models match Hugging Face transformers on the same tiny checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.model.pipeline import LocalPipeline
from shared.model.tiny import write_tiny_checkpoint

transformers = pytest.importorskip("transformers")
PROMPT = [5, 17, 42, 99, 3, 250, 61, 7, 8, 120, 33, 64, 1, 0, 2]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(model_class: Any, folder: Path) -> torch.nn.Module:
    model = model_class.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize(
    ("architecture", "tied", "model_class"),
    [
        ("gpt2", True, "GPT2LMHeadModel"),
        ("gpt2", False, "GPT2LMHeadModel"),
        ("llama", True, "LlamaForCausalLM"),
        ("llama", False, "LlamaForCausalLM"),
    ],
)
def test_decoder_logits_match_transformers(
    tmp_path: Path, architecture: str, tied: bool, model_class: str
) -> None:
    folder = write_tiny_checkpoint(
        architecture, tmp_path / architecture, layers=3, seed=2, tie_word_embeddings=tied
    )
    reference = _reference(getattr(transformers, model_class), folder)
    with torch.inference_mode():
        expected = reference(torch.tensor([PROMPT])).logits[0]  # [T, V]
    ours = LocalPipeline(folder, (1,))
    torch.testing.assert_close(ours.logits(PROMPT), expected, atol=1e-4, rtol=0)
    # KV-cached greedy decoding agrees with the reference's own cached generation
    generated = ours.generate(PROMPT, 12, stop_at_eos=False).token_ids
    with torch.inference_mode():
        full = reference(torch.tensor([PROMPT + list(generated)])).logits[0]
    assert full[len(PROMPT) - 1 : -1].argmax(-1).tolist() == list(generated)


def test_bert_sentence_embedding_matches_transformers(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint("bert", tmp_path / "bert", layers=3, seed=2)
    reference = _reference(transformers.BertModel, folder)
    ours = LocalPipeline(folder, (2,))
    ids = ours.tokenizer.encode("Edge nodes split a transformer. Hello world!")
    with torch.inference_mode():
        hidden = reference(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [T, H]
    expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
    torch.testing.assert_close(torch.tensor(ours.embed(ids)), expected, atol=1e-5, rtol=0)
