"""Split execution equals unsplit execution, and KV-cached decoding equals recompute."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.model.pipeline import LocalPipeline
from shared.model.sampling import SamplingParams
from shared.model.tiny import write_tiny_checkpoint

LAYERS = 4
SPLITS = [(), (1, 2, 3), (2,), (1, 3)]  # one segment; one per block; in between
DECODERS = [("gpt2", True), ("llama", True), ("llama", False)]
PROMPT = [5, 17, 42, 99, 3, 250, 61, 7, 8, 120, 33, 64]
DECODE_STEPS = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, above all on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("tiny")
    folders = {}
    for architecture, tied in [*DECODERS, ("bert", True)]:
        out = root / f"{architecture}-{'tied' if tied else 'untied'}"
        folders[(architecture, tied)] = write_tiny_checkpoint(
            architecture, out, LAYERS, seed=1, tie_word_embeddings=tied
        )
    return folders


@pytest.mark.parametrize(("architecture", "tied"), DECODERS)
def test_split_decoders_match_unsplit(models: dict, architecture: str, tied: bool) -> None:
    whole = LocalPipeline(models[(architecture, tied)])
    reference_logits = whole.logits(PROMPT)
    reference = whole.generate(PROMPT, DECODE_STEPS, stop_at_eos=False)
    assert len(reference.token_ids) == DECODE_STEPS
    assert len(set(reference.token_ids)) > 1  # a non-degenerate run
    for splits in SPLITS[1:]:
        split = LocalPipeline(models[(architecture, tied)], splits)
        assert len(split.segments) == len(splits) + 1
        torch.testing.assert_close(split.logits(PROMPT), reference_logits, atol=1e-5, rtol=0)
        assert (
            split.generate(PROMPT, DECODE_STEPS, stop_at_eos=False).token_ids == reference.token_ids
        )


@pytest.mark.parametrize(("architecture", "tied"), DECODERS)
@pytest.mark.parametrize("splits", [(), (2,)])
def test_cached_decode_equals_full_recompute(
    models: dict, architecture: str, tied: bool, splits: tuple
) -> None:
    pipeline = LocalPipeline(models[(architecture, tied)], splits)
    generated = pipeline.generate(PROMPT, DECODE_STEPS, stop_at_eos=False).token_ids
    sequence = PROMPT + list(generated)
    full = pipeline.logits(sequence)  # one pass, no cache: [T, V]
    assert full[len(PROMPT) - 1 : -1].argmax(dim=-1).tolist() == list(generated)

    caches = [segment.new_cache() for segment in pipeline.segments]
    hidden = pipeline.hidden_states(torch.tensor(PROMPT), caches, 0)
    stepped = [pipeline.entry.logits(hidden)]
    for position in range(len(PROMPT), len(sequence)):
        hidden = pipeline.hidden_states(torch.tensor([sequence[position]]), caches, position)
        stepped.append(pipeline.entry.logits(hidden))
    # within 1e-5 of the logits' scale: one-row steps and the full pass run different
    # matrix-product kernels (layers.SKINNY_ROWS), which round differently
    torch.testing.assert_close(torch.cat(stepped), full, atol=1e-5 * float(full.abs().max()), rtol=1e-5)
    assert all(cache.length == len(sequence) for cache in caches)


def test_untied_head_is_its_own_tensor_and_tied_head_is_the_embedding(
    models: dict, tmp_path: Path
) -> None:
    for tied in (True, False):
        folder = tmp_path / f"copy-{tied}"
        shutil.copytree(models[("llama", tied)], folder)
        before = LocalPipeline(folder).logits(PROMPT)
        tensors = load_file(str(folder / "model.safetensors"))
        if tied:
            assert "lm_head.weight" not in tensors
            tensors["lm_head.weight"] = torch.zeros_like(
                tensors["model.embed_tokens.weight"]
            )  # ignored
        else:
            assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
            tensors["lm_head.weight"] = (
                2 * tensors["lm_head.weight"]
            )  # logits are linear in the head
        save_file(tensors, str(folder / "model.safetensors"))
        after = LocalPipeline(folder).logits(PROMPT)
        torch.testing.assert_close(after, before if tied else 2 * before, atol=1e-5, rtol=1e-6)


def test_bert_split_embeddings_match_unsplit(models: dict) -> None:
    whole = LocalPipeline(models[("bert", True)])
    ids = whole.tokenizer.encode("The capital of France is Paris.")
    reference = torch.tensor(whole.embed(ids))
    assert abs(float(reference.norm()) - 1.0) < 1e-5
    reference_hidden = whole.hidden_states(torch.tensor(ids), None, 0)
    for splits in SPLITS[1:]:
        split = LocalPipeline(models[("bert", True)], splits)
        torch.testing.assert_close(
            split.hidden_states(torch.tensor(ids), None, 0), reference_hidden, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(torch.tensor(split.embed(ids)), reference, atol=1e-6, rtol=0)


def test_seeded_sampling_through_split_pipeline_is_reproducible(models: dict) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    whole = LocalPipeline(models[("gpt2", True)])
    split = LocalPipeline(models[("gpt2", True)], (1, 3))
    first = whole.generate(PROMPT, 16, params, stop_at_eos=False).token_ids
    assert split.generate(PROMPT, 16, params, stop_at_eos=False).token_ids == first
    assert whole.generate(PROMPT, 16, params, stop_at_eos=False).token_ids == first


def test_generation_stops_at_eos_and_streams_tokens(models: dict) -> None:
    pipeline = LocalPipeline(models[("llama", True)])
    free_run = pipeline.generate(PROMPT, 8, stop_at_eos=False).token_ids
    streamed: list[int] = []
    stop_id = free_run[3]
    result = pipeline.generate(PROMPT, 8, on_token=streamed.append, stop_token_ids=[stop_id])
    first_stop = free_run.index(stop_id)
    assert result.token_ids == free_run[: first_stop + 1]
    assert streamed == list(result.token_ids)
    assert result.ttft_s > 0 and result.tpot_s >= 0
