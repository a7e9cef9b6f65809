"""Quantised shards split over three real worker processes on a real Mosquitto.

For the same quantised shard store (int8, int4 and bf16 linear weights), greedy tokens
through three workers (car [0,1), rsu [1,3), mec [3,4)) equal the same store run in
one process with the same cuts (issue #22: split equals unsplit at every precision),
and MiniLM-shaped BERT embeddings match the in-process ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.cli.client import ClientOptions
from services.cli.client import request as client_request
from shared.broker import LocalBroker
from shared.messages import EmbeddingReady, EmbedRequest, GenerateRequest, RequestFinished
from shared.model.pipeline import LocalPipeline
from shared.model.shard import ShardStore, write_shards
from shared.model.tiny import write_tiny_checkpoint
from tests.integration.cluster import WorkerCluster, make_plan, publish_plan, settings_for

pytestmark = pytest.mark.integration
SPLITS = (1, 3)
SEGMENTS = (("car", 0, 1), ("rsu", 1, 3), ("mec", 3, 4))
PROMPTS = [[5, 17, 42], [1, 2, 3, 4, 5, 6], [250, 13, 7, 7, 7]]


class QuantisedSystem:
    def __init__(self, architecture: str, weights: str, broker: LocalBroker, root: Path) -> None:
        model_dir = write_tiny_checkpoint(architecture, root / "model", layers=4, seed=3)
        self.shards = root / "shards"
        write_shards(model_dir, self.shards, weights=weights)
        self.settings = settings_for(broker.url, f"q{architecture}{weights}")
        self.workers = WorkerCluster(broker.url, f"q{architecture}{weights}", self.shards, root)
        self.local = LocalPipeline(ShardStore(self.shards), SPLITS)  # the same shards, one process
        self.fp32 = LocalPipeline(model_dir, SPLITS)

    def start(self, *extra: str) -> None:
        for node, trust in (("car", "2"), ("rsu", "1"), ("mec", "0")):
            self.workers.start(node, "--trust", trust, *extra)
        plan = make_plan(1, "car", SEGMENTS, self.settings.plan_signing_key)
        rejected = asyncio.run(publish_plan(self.settings, plan))
        assert not rejected, {node: self.workers.log_tail(node) for node in rejected}

    def ask(self, make: object) -> object:
        return asyncio.run(client_request(ClientOptions(self.settings, timeout_s=30.0), make))  # type: ignore[arg-type]


def _system(architecture: str, weights: str, broker: LocalBroker, root: Path,
            *extra: str) -> Iterator[QuantisedSystem]:  # fmt: skip
    torch.set_num_threads(1)
    system = QuantisedSystem(architecture, weights, broker, root)
    try:
        system.start(*extra)
        yield system
    finally:
        system.workers.stop()


@pytest.fixture(scope="module", params=[
    "int8", pytest.param("int4", marks=pytest.mark.slow), pytest.param("bf16", marks=pytest.mark.slow)])
def llama(request: pytest.FixtureRequest, broker: LocalBroker,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuantisedSystem]:  # fmt: skip
    weights = str(request.param)
    yield from _system("llama", weights, broker, tmp_path_factory.mktemp(f"llama-{weights}"))


def test_quantised_generation_through_three_workers_equals_one_process(llama: QuantisedSystem) -> None:
    assert llama.local.segments[0].weights == ShardStore(llama.shards).weight_precision != "fp32"
    differs = False
    for index, prompt in enumerate(PROMPTS):
        def make(client: str, prompt: list[int] = prompt, index: int = index) -> GenerateRequest:
            return GenerateRequest(request_id=f"q{index}", reply_to=client,  # type: ignore[arg-type]
                                   token_ids=tuple(prompt), max_new_tokens=24)  # fmt: skip

        result = llama.ask(make)
        assert isinstance(result, RequestFinished)
        local = llama.local.generate(prompt, 24)
        assert result.token_ids == local.token_ids, prompt
        assert len(set(local.token_ids)) > 1  # not a degenerate comparison
        differs |= not torch.equal(llama.local.logits(prompt), llama.fp32.logits(prompt))
    assert differs  # the workers really ran quantised weights, not fp32


@pytest.fixture(scope="module")
def bert(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuantisedSystem]:
    yield from _system("bert", "int8", broker, tmp_path_factory.mktemp("bert-int8"))


def test_int8_embedding_through_three_workers_equals_one_process(bert: QuantisedSystem) -> None:
    text = "a road-side unit sees a car"

    def make(client: str) -> EmbedRequest:
        return EmbedRequest(request_id="e1", reply_to=client, text=text, timeout_s=30.0)  # type: ignore[arg-type]

    result = bert.ask(make)
    assert isinstance(result, EmbeddingReady)
    local = bert.local.embed(bert.local.tokenizer.encode(text))
    assert max(abs(a - b) for a, b in zip(result.embedding, local, strict=True)) < 1e-5


@pytest.fixture(scope="module")
def bert_int8_frames(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuantisedSystem]:
    yield from _system("bert", "fp32", broker, tmp_path_factory.mktemp("bert-frames"),
                       "--activation-precision", "int8")


def test_int8_activation_frames_cost_little_quality(bert_int8_frames: QuantisedSystem) -> None:
    """Every hop sends int8 activations with a scale per row: the embedding moves (the
    frames really were compressed) but stays within 1e-3 cosine of the exact one."""
    system, text = bert_int8_frames, "the uplink of the road-side unit is congested"

    def make(client: str) -> EmbedRequest:
        return EmbedRequest(request_id="f1", reply_to=client, text=text, timeout_s=30.0)  # type: ignore[arg-type]

    result = system.ask(make)
    assert isinstance(result, EmbeddingReady)
    exact = torch.tensor(system.local.embed(system.local.tokenizer.encode(text)))
    got = torch.tensor(result.embedding)
    assert not torch.allclose(got, exact, atol=1e-6)
    assert float(got @ exact) > 0.999
