"""Sampling, decode-loop rules, KV caches and incremental detokenisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from shared.errors import ConfigError, ContextTooLong
from shared.model.kv_cache import CacheMismatch, SegmentCache
from shared.model.sampling import Sampler, SamplingParams, check_context, should_stop
from shared.model.tiny import write_tiny_checkpoint
from shared.model.tokenizer import TextTokenizer

TEXT = "Hello world! naïve café — 日本語 ☃ 🚀 The capital of France is Paris."


def test_greedy_is_argmax_and_top_p_keeps_the_nucleus() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams()).next_token(logits) == 1
    narrow = Sampler(SamplingParams(temperature=1.0, top_p=0.01, seed=1))
    assert {narrow.next_token(logits) for _ in range(50)} == {1}
    wide = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=1))
    assert {wide.next_token(logits) for _ in range(200)} == {1, 2}  # 3.0 and 2.9 hold > 0.9


def test_sampling_is_deterministic_for_a_seed() -> None:
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.5, top_p=0.95, seed=seed))
        return [sampler.next_token(logits) for _ in range(40)]

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)


@pytest.mark.parametrize("params", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_params_are_rejected(params: dict) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**params)


def test_decode_loop_rules() -> None:
    check_context(10, 6, 16)
    with pytest.raises(ContextTooLong, match="16"):
        check_context(10, 7, 16)
    with pytest.raises(ConfigError):
        check_context(0, 1, 16)
    assert should_stop(5, 3, 3, [2]) and not should_stop(5, 2, 3, [2])
    assert should_stop(2, 1, 3, [2]) and not should_stop(2, 1, 3, [2], stop_at_eos=False)


def test_segment_cache_grows_exports_imports_and_truncates() -> None:
    cache = SegmentCache(range(4, 7), num_kv_heads=2, head_dim=8)
    for step in range(40):  # grows past the first capacities
        for index in cache.blocks:
            key = torch.full((2, 1, 8), float(step + index))
            cache.block(index).append(key, -key)
    assert cache.length == 40 and cache.nbytes == 3 * 2 * 2 * 40 * 8 * 4
    exported = cache.export([5, 6])
    assert exported[6][0].shape == (2, 40, 8) and exported[6][0][0, 39, 0] == 39 + 6
    receiver = SegmentCache(range(7, 9), num_kv_heads=2, head_dim=8)
    with pytest.raises(CacheMismatch):
        receiver.import_blocks(exported)  # 0 tokens in its own blocks vs 40 imported
    receiver.drop_blocks([7, 8])
    receiver.import_blocks(exported)
    cache.drop_blocks([5, 6])
    assert receiver.blocks == (5, 6) and cache.blocks == (4,)
    torch.testing.assert_close(receiver.block(5).view()[1], exported[5][1])
    receiver.truncate(10)
    assert receiver.length == 10 and receiver.block(6).view()[0][0, -1, 0] == 9 + 6
    with pytest.raises(CacheMismatch):
        receiver.truncate(11)
    with pytest.raises(CacheMismatch, match="block 4"):
        receiver.block(4)


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "bert"])
def test_stream_decoder_reproduces_decode(tmp_path: Path, architecture: str) -> None:
    folder = write_tiny_checkpoint(architecture, tmp_path / architecture, layers=1)
    tokenizer = TextTokenizer.from_file(folder / "tokenizer.json")
    ids = tokenizer.encode(TEXT)
    stream = tokenizer.stream()
    pieces = [stream.push(token_id) for token_id in ids]
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids)
    if architecture != "bert":
        assert tokenizer.decode(ids) == TEXT
        assert "" in pieces  # some characters span several byte-level tokens
        truncated = ids[: ids.index(tokenizer.encode("🚀")[0]) + 1]  # ends inside the emoji
        stream = tokenizer.stream()
        held = "".join(stream.push(token_id) for token_id in truncated)
        assert held + stream.flush() == tokenizer.decode(truncated)


def test_tokenizer_padding_and_truncation_are_switched_off(tmp_path: Path) -> None:
    folder = write_tiny_checkpoint("bert", tmp_path / "bert", layers=1)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    raw.enable_truncation(max_length=8)
    raw.save(str(folder / "tokenizer.json"))
    ids = TextTokenizer.from_file(folder / "tokenizer.json").encode(TEXT)
    assert 8 < len(ids) < 128 and 0 not in ids
    assert ids[0] == raw.token_to_id("[CLS]") and ids[-1] == raw.token_to_id("[SEP]")


def test_tiny_checkpoints_are_deterministic(tmp_path: Path) -> None:
    first = write_tiny_checkpoint("llama", tmp_path / "a", layers=2, seed=5)
    second = write_tiny_checkpoint("llama", tmp_path / "b", layers=2, seed=5)
    other = write_tiny_checkpoint("llama", tmp_path / "c", layers=2, seed=6)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
