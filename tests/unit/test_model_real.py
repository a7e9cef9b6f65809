"""Real pretrained models from the installed packages (slow tier)."""

from __future__ import annotations

import pytest
import torch

from shared.errors import ModelPackageMissing
from shared.model.pipeline import LocalPipeline

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


def _prepared(name: str):
    from shared.model.prepare import prepare_model

    try:
        return prepare_model(name)
    except ModelPackageMissing as error:
        pytest.skip(str(error))


def test_minilm_embedding_matches_sentence_transformers_recipe() -> None:
    folder = _prepared("minilm")
    ours = LocalPipeline(folder, (2, 4))
    ids = ours.tokenizer.encode("Edge computers share the work of a transformer.")
    reference = transformers.BertModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        hidden = reference(input_ids=torch.tensor([ids])).last_hidden_state[0]
    expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
    torch.testing.assert_close(torch.tensor(ours.embed(ids)), expected, atol=1e-5, rtol=0)


def test_smollm2_split_continues_the_capitals() -> None:
    folder = _prepared("smollm2")
    whole = LocalPipeline(folder)
    split = LocalPipeline(folder, (10, 20))
    prompt = whole.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    torch.testing.assert_close(split.logits(prompt), whole.logits(prompt), atol=1e-4, rtol=0)
    tokens = split.generate(prompt, 8).token_ids
    assert tokens == whole.generate(prompt, 8).token_ids
    assert whole.tokenizer.decode(tokens).startswith(" Berlin.")
    reference = transformers.LlamaForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(whole.logits(prompt), expected, atol=2e-4, rtol=0)
