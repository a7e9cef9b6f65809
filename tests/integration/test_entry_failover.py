"""The entry node dies and the next committed plan names another entry: each client
resubmits with the tokens it already has, and the caller sees one uninterrupted answer.

The re-plan is driven by hand here, to test the worker and client sides alone; the
full stack, where the orchestrator names the new entry itself, is in
test_fault_tolerance.py."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
import torch

from services.cli.client import ClientOptions, request
from shared.broker import LocalBroker
from shared.messages import GenerateRequest, RequestFinished, TokenGenerated
from shared.model.pipeline import LocalPipeline
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from tests.integration.cluster import (
    WorkerCluster,
    make_plan,
    publish_plan,
    settings_for,
    two_phase,
)

pytestmark = pytest.mark.integration


def test_entry_dies_clients_resubmit_to_the_new_entry(broker: LocalBroker, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = write_tiny_checkpoint("llama", tmp_path / "model", layers=6, seed=4)
    shards = tmp_path / "shards"
    write_shards(model, shards)
    local = LocalPipeline(model, ())
    settings = settings_for(broker.url, "entry" + tmp_path.name[-8:].replace("_", ""))
    workers = WorkerCluster(broker.url, settings.cluster, shards, tmp_path)
    key = settings.plan_signing_key
    prompts = [[7 + i, 30 + 5 * i, 2] for i in range(3)]
    arrivals: list[list[int]] = [[] for _ in prompts]

    async def one(index: int) -> RequestFinished:
        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id=f"ef{index}", reply_to=client,  # type: ignore[arg-type]
                                   token_ids=tuple(prompts[index]), max_new_tokens=50)  # fmt: skip

        def on_token(token: TokenGenerated) -> None:
            arrivals[index].append(token.index)

        result = await request(ClientOptions(settings, timeout_s=60), make, on_token)
        assert isinstance(result, RequestFinished)
        return result

    async def scenario() -> tuple[list[RequestFinished], float]:
        tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
        async with asyncio.timeout(30):
            while min(len(a) for a in arrivals) < 5:  # noqa: ASYNC110 - polls test state
                await asyncio.sleep(0.01)
        workers.signal("car", signal.SIGKILL)
        killed = time.monotonic()
        plan = make_plan(2, "car2", (("car2", 0, 2), ("rsu", 2, 4), ("mec", 4, 6)), key)
        answers = await two_phase(settings, plan)
        assert set(answers.values()) == {"ready"}, answers
        results = await asyncio.gather(*tasks)
        return results, time.monotonic() - killed

    try:
        for node, trust in (("car", "2"), ("car2", "2"), ("rsu", "1"), ("mec", "0")):
            workers.start(node, "--trust", trust)
        assert not asyncio.run(publish_plan(settings, make_plan(1, "car", (("car", 0, 2), ("rsu", 2, 4),
                                                                           ("mec", 4, 6)), key)))  # fmt: skip
        results, took_s = asyncio.run(scenario())
    finally:
        workers.stop()
    for prompt, result, seen in zip(prompts, results, arrivals, strict=True):
        assert result.token_ids == local.generate(prompt, 50).token_ids
        assert seen == list(range(len(result.token_ids)))  # each token once, in order
    assert "(entry)" in workers.log_tail("car2", 400)
    print(f"entry killed; all requests done {took_s:.2f} s later on the new entry")
