"""Live reconfiguration on the worker side: make-before-break epochs with requests in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
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


class Site:
    def __init__(self, broker: LocalBroker, root: Path) -> None:
        self.model_dir = write_tiny_checkpoint("llama", root / "model", layers=6, seed=5)
        self.shards = root / "shards"
        write_shards(self.model_dir, self.shards)
        self.settings = settings_for(broker.url, "reconf" + root.name[-6:].replace("_", ""))
        self.workers = WorkerCluster(broker.url, self.settings.cluster, self.shards, root)
        self.local = LocalPipeline(self.model_dir, ())
        self.key = self.settings.plan_signing_key
        self.mode = "handoff"


@pytest.fixture(params=["handoff", "replay"])
def site(broker: LocalBroker, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    """Workers that move KV caches when split points move, or (the fallback) replay."""
    torch.set_num_threads(1)
    site = Site(broker, tmp_path)
    site.mode = request.param
    site.workers.extra_env = {"EDGESPLIT_KV_HANDOFF": "true" if request.param == "handoff" else "false"}
    try:
        policy = ("--private-blocks", "2", "--trusted-level", "2", "--slowdown", "3")
        site.workers.start("car", "--trust", "2", *policy)
        site.workers.start("rsu", "--trust", "1", *policy)
        site.workers.start("mec", "--trust", "0", *policy)
        plan = make_plan(1, "car", (("car", 0, 2), ("rsu", 2, 4), ("mec", 4, 6)), site.key)
        assert not asyncio.run(publish_plan(site.settings, plan))
        yield site
    finally:
        site.workers.stop()


async def _decode_while(site: Site, prompts: list[list[int]], tokens: int, change: object) -> list[RequestFinished]:
    """Start one request per prompt; once every request has streamed a few tokens, run
    ``change()`` (a coroutine function); return the finished requests."""
    started = asyncio.Event()
    progress: dict[int, int] = {}

    def counter(index: int):  # noqa: ANN202
        def on_token(token: TokenGenerated) -> None:
            progress[index] = token.index + 1
            if len(progress) == len(prompts) and min(progress.values()) >= 3:
                started.set()
        return on_token

    async def one(index: int, prompt: list[int]) -> RequestFinished:
        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id=f"q{index}", reply_to=client, token_ids=tuple(prompt),  # type: ignore[arg-type]
                                   max_new_tokens=tokens)  # fmt: skip
        result = await request(ClientOptions(site.settings, timeout_s=60), make, counter(index))
        assert isinstance(result, RequestFinished)
        return result

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(i, p)) for i, p in enumerate(prompts)]
        async with asyncio.timeout(30):
            await started.wait()
        assert max(progress.values()) < tokens, "requests finished before the change"
        await change()  # type: ignore[operator]
    return [task.result() for task in tasks]


def test_boundary_move_with_eight_requests_in_flight_loses_nothing(site: Site) -> None:
    prompts = [[3 + i, 40 + i, 7, 90 + 2 * i] for i in range(8)]
    moved = make_plan(2, "car", (("car", 0, 2), ("rsu", 2, 5), ("mec", 5, 6)), site.key)
    answers: dict[str, str] = {}

    async def change() -> None:
        answers.update(await two_phase(site.settings, moved))

    results = asyncio.run(_decode_while(site, prompts, 40, change))
    assert answers == {"car": "ready", "rsu": "ready", "mec": "ready"}
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == site.local.generate(prompt, 40).token_ids, prompt
    log = site.workers.log_tail("car", 400)
    if site.mode == "handoff":
        assert "KV handed over from epoch 1 to 2" in log and "replaying" not in log
    else:
        assert "replaying" in log and "KV handed over" not in log
    assert "serving epoch 2" in site.workers.log_tail("mec", 400)


def test_migration_to_other_nodes_and_a_refused_plan(site: Site) -> None:
    prompts = [[11, 12, 13], [200, 100, 50, 25]]
    # Migration: the same cut points, segments on other nodes (mec and rsu swap).
    migrated = make_plan(2, "car", (("car", 0, 2), ("mec", 2, 4), ("rsu", 4, 6)), site.key)

    async def change() -> None:
        assert set((await two_phase(site.settings, migrated)).values()) == {"ready"}

    for prompt, result in zip(prompts, asyncio.run(_decode_while(site, prompts, 40, change)), strict=True):
        assert result.token_ids == site.local.generate(prompt, 40).token_ids
    # A forged plan (bad signature) and a plan putting the private blocks on an untrusted
    # node: refused by the nodes concerned, aborted, and epoch 2 keeps serving.
    forged = make_plan(3, "car", (("car", 0, 3), ("rsu", 3, 6)), "not-the-key")
    answers = asyncio.run(two_phase(site.settings, forged))
    assert all("signature" in reason for reason in answers.values())
    private_on_untrusted = make_plan(3, "car", (("car", 0, 1), ("mec", 1, 6)), site.key)
    answers = asyncio.run(two_phase(site.settings, private_on_untrusted))
    assert answers["car"] == "ready" and "need trust >= 2" in answers["mec"]
    result = asyncio.run(request(ClientOptions(site.settings, timeout_s=30), lambda client: GenerateRequest(
        request_id="after", reply_to=client, token_ids=(5, 6, 7), max_new_tokens=8)))  # type: ignore[arg-type]  # fmt: skip
    assert isinstance(result, RequestFinished)
    assert result.token_ids == site.local.generate([5, 6, 7], 8).token_ids
