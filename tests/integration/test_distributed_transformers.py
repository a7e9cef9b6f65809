"""The distributed stack against Hugging Face transformers itself, one test per model
family: three real worker processes on a real Mosquitto serve a tiny checkpoint split
[0,1) [1,3) [3,4) (tests/integration/test_distributed.py's set-up), and their answers
must equal what transformers computes on the same checkpoint folder (loaded with
``from_pretrained``; nothing downloads). The other distributed tests compare with the
project's own unsplit pipeline, which shares runtime code with the workers; this one
shares none of it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.cli.client import request as send_request
from shared.broker import LocalBroker
from shared.messages import EmbeddingReady, EmbedRequest
from shared.model.config import load_config
from tests.integration.test_distributed import PROMPTS, System, _generate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.integration
TOKENS = 24


def _system(architecture: str, broker: LocalBroker, root: Path) -> Iterator[System]:
    system = System(architecture, broker, f"hf{architecture}", root)
    torch.set_num_threads(1)
    try:
        system.start()
        yield system
    finally:
        system.workers.stop()


@pytest.fixture(scope="module")
def llama(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    yield from _system("llama", broker, tmp_path_factory.mktemp("hf-llama"))


@pytest.fixture(scope="module")
def gpt2(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    yield from _system("gpt2", broker, tmp_path_factory.mktemp("hf-gpt2"))


@pytest.fixture(scope="module")
def bert(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    yield from _system("bert", broker, tmp_path_factory.mktemp("hf-bert"))


def _reference(model_class: str, folder: Path) -> Any:
    return getattr(transformers, model_class).from_pretrained(str(folder), dtype=torch.float32).eval()


def _transformers_greedy(model: Any, prompt: list[int], tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` for exactly ``tokens`` new tokens (no stop
    at end-of-sequence: the caller compares up to where the stack stopped)."""
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return [int(token) for token in output[0, len(prompt) :]]


@pytest.mark.parametrize(("family", "model_class"), [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_distributed_greedy_tokens_equal_transformers_generate(
    family: str, model_class: str, request: pytest.FixtureRequest
) -> None:
    system: System = request.getfixturevalue(family)
    reference = _reference(model_class, system.model_dir)
    eos = set(load_config(reference.config.to_dict()).eos_token_ids)
    for prompt in PROMPTS:
        ours = list(_generate(system, prompt, TOKENS).token_ids)
        theirs = _transformers_greedy(reference, prompt, TOKENS)
        assert ours == theirs[: len(ours)], (prompt, ours, theirs)
        # The stack stops early only at an end-of-sequence token, which it returns.
        assert len(ours) == TOKENS or ours[-1] in eos, (prompt, ours)
        assert ours, prompt


def test_distributed_bert_embeddings_equal_transformers(bert: System) -> None:
    reference = _reference("BertModel", bert.model_dir)
    for text in ("edge split inference", "a road side unit talks to a car"):
        def make(client: str, text: str = text) -> EmbedRequest:
            return EmbedRequest(request_id="hf1", reply_to=client, text=text)  # type: ignore[arg-type]

        result = asyncio.run(send_request(bert.options(), make))
        assert isinstance(result, EmbeddingReady)
        ids = bert.local.tokenizer.encode(text)
        with torch.inference_mode():
            hidden = reference(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [T, H]
        expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).numpy()
        assert np.allclose(result.embedding, expected, atol=1e-5), text
