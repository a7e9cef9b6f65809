"""The entry's prompt text: its length checked before tokenizing, tokenized off the loop.

A real `EntryRole` over a tiny llama (its runtime, tokenizer and a compute thread); the
pipeline behind it is the unsplit model run on that compute thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from services.worker.compute import ComputeThread, SegmentHost, Slowdown
from services.worker.entry import EntryRole, NextToken, ReplyMessage
from services.worker.prompt import CHARS_PER_TOKEN_BOUND, PromptLimits
from services.worker.settings import WorkerSettings
from shared.messages import GenerateRequest, RequestFailed, RequestFinished
from shared.model.checkpoint import Checkpoint
from shared.model.runtime import EntryRuntime
from shared.model.tiny import write_tiny_checkpoint
from shared.model.tokenizer import TextTokenizer


class RecordingTokenizer(TextTokenizer):
    """The model's tokenizer, noting the thread of each encode."""

    encoded_on: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded_on.append(threading.get_ident())
        return super().encode(text, add_special_tokens)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return Checkpoint(write_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), layers=4, seed=3))


Run = Callable[[GenerateRequest], tuple[ReplyMessage, list[int], int]]


@pytest.fixture
def make_entry(source: Checkpoint) -> Iterator[Callable[..., Run]]:
    threads: list[ComputeThread] = []

    def make(max_prompt_tokens: int = 8192, max_prompt_chars: int | None = None) -> Run:
        compute = ComputeThread()
        threads.append(compute)
        tokenizer = RecordingTokenizer.from_file(source.tokenizer_path)
        assert isinstance(tokenizer, RecordingTokenizer)
        tokenizer.encoded_on = []
        host = SegmentHost(source, 0, 4)
        replies: list[ReplyMessage] = []

        async def pipeline_pass(request_id: str, step: int, token_ids: np.ndarray, position: int,
                                last_only: bool, head: NextToken | None) -> tuple[np.ndarray, int]:  # fmt: skip
            def job() -> np.ndarray:
                ids = head() if head is not None else token_ids
                hidden = host.forward(request_id, role.embed_tokens(ids, position), position, Slowdown())
                return hidden[-1:] if last_only else hidden

            return await compute.run(job), 1

        role = EntryRole(EntryRuntime(source), tokenizer, compute.run, pipeline_pass,
                         lambda _client, reply: replies.append(reply), 4, max_prompt_tokens,
                         current_epoch=lambda: 1, max_prompt_chars=max_prompt_chars)  # fmt: skip

        def run(request: GenerateRequest) -> tuple[ReplyMessage, list[int], int]:
            async def main() -> int:
                await asyncio.wait_for(role.serve(request), 60)
                return threading.get_ident()

            loop_thread = asyncio.run(main())
            return replies[-1], tokenizer.encoded_on, loop_thread

        return run

    yield make
    for thread in threads:
        thread.close()


def _request(prompt: str) -> GenerateRequest:
    return GenerateRequest(request_id="p1", reply_to="c", prompt=prompt, max_new_tokens=3)  # type: ignore[arg-type]


def test_the_character_limit_defaults_to_16_per_token_of_the_context(source: Checkpoint) -> None:
    assert CHARS_PER_TOKEN_BOUND == 16
    assert PromptLimits.of(source.config, 8192).max_chars == 16 * 256  # the tiny model's context
    assert PromptLimits.of(source.config, 100).max_chars == 16 * 100  # the entry's token limit
    assert PromptLimits.of(source.config, 100, 50).max_chars == 50
    assert WorkerSettings(node_id="w", shards_dir=Path("s")).max_prompt_chars is None


def test_text_over_the_character_limit_is_refused_without_tokenizing(make_entry: Callable[..., Run]) -> None:
    reply, encoded_on, _ = make_entry()(_request("a" * (16 * 256 + 1)))
    assert isinstance(reply, RequestFailed) and reply.error == "context_too_long"
    assert "prompt of 4097 characters exceeds this entry's limit of 4096" in reply.message
    assert encoded_on == []

    reply, encoded_on, _ = make_entry(max_prompt_chars=10)(_request("hello world"))
    assert isinstance(reply, RequestFailed) and reply.error == "context_too_long"
    assert encoded_on == []


def test_text_within_the_limit_is_tokenized_off_the_event_loop(make_entry: Callable[..., Run]) -> None:
    reply, encoded_on, loop_thread = make_entry()(_request("hello world"))
    assert isinstance(reply, RequestFinished) and len(reply.token_ids) == 3, reply
    assert len(encoded_on) == 1 and encoded_on[0] != loop_thread


def test_text_within_the_characters_but_over_the_tokens_is_refused_after_tokenizing(
    make_entry: Callable[..., Run],
) -> None:
    reply, encoded_on, loop_thread = make_entry(max_prompt_tokens=8)(_request("hello world, and more"))
    assert isinstance(reply, RequestFailed) and reply.error == "context_too_long", reply
    assert "tokens exceeds this entry's limit of 8" in reply.message
    assert len(encoded_on) == 1 and encoded_on[0] != loop_thread

