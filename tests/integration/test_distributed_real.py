"""Slow tier: SmolLM2-135M over three worker processes gives the local greedy tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.cli.client import ClientOptions, request
from services.cli.launcher import ensure_shards
from shared.broker import LocalBroker
from shared.messages import GenerateRequest, RequestFinished
from shared.model.pipeline import LocalPipeline
from shared.model.prepare import default_models_dir, prepare_model
from shared.model.tokenizer import TextTokenizer
from tests.integration.cluster import WorkerCluster, make_plan, publish_plan, settings_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]
PROMPT = "The capital of France is Paris. The capital of Germany is"


def test_smollm2_over_three_workers_equals_local(broker: LocalBroker, tmp_path: Path) -> None:
    model_dir = prepare_model("smollm2")
    shards = ensure_shards(model_dir, default_models_dir() / "smollm2-shards")
    settings = settings_for(broker.url, "smollm2real")
    workers = WorkerCluster(broker.url, settings.cluster, shards, tmp_path)
    try:
        for node, trust in (("car", "2"), ("rsu", "1"), ("mec", "0")):
            workers.start(node, "--trust", trust)
        plan = make_plan(1, "car", (("car", 0, 10), ("rsu", 10, 20), ("mec", 20, 30)),
                         settings.plan_signing_key)  # fmt: skip
        assert not asyncio.run(publish_plan(settings, plan, timeout_s=180))

        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id="smol1", reply_to=client, prompt=PROMPT,  # type: ignore[arg-type]
                                   max_new_tokens=12)  # fmt: skip

        result = asyncio.run(request(ClientOptions(settings, timeout_s=120), make))
        assert isinstance(result, RequestFinished)
    finally:
        workers.stop()
    tokenizer = TextTokenizer.from_file(model_dir / "tokenizer.json")
    local = LocalPipeline(model_dir, (10, 20)).generate(tokenizer.encode(PROMPT), 12)
    assert result.token_ids == local.token_ids
    assert result.text.startswith(" Berlin")
