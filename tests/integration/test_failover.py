"""Fault tolerance on the worker side: a node dies mid-decode, a new epoch routes around
it, and every request completes with the tokens of an undisturbed run."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.cli.client import ClientOptions, request
from shared.broker import LocalBroker
from shared.errors import ServingError
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
PLAN_1 = (("car", 0, 2), ("rsu", 2, 4), ("mec", 4, 6))
AROUND_RSU = (("car", 0, 2), ("spare", 2, 4), ("mec", 4, 6))


class Site:
    def __init__(self, broker: LocalBroker, root: Path) -> None:
        self.model_dir = write_tiny_checkpoint("llama", root / "model", layers=6, seed=9)
        self.shards = root / "shards"
        write_shards(self.model_dir, self.shards)
        self.settings = settings_for(broker.url, "fail" + root.name[-8:].replace("_", ""))
        self.workers = WorkerCluster(broker.url, self.settings.cluster, self.shards, root)
        self.local = LocalPipeline(self.model_dir, ())


@pytest.fixture
def site(broker: LocalBroker, tmp_path: Path) -> Iterator[Site]:
    torch.set_num_threads(1)
    site = Site(broker, tmp_path)
    try:
        for node, trust in (("car", "2"), ("rsu", "1"), ("mec", "0"), ("spare", "1")):
            site.workers.start(node, "--trust", trust, "--slowdown", "4")
        key = site.settings.plan_signing_key
        assert not asyncio.run(publish_plan(site.settings, make_plan(1, "car", PLAN_1, key)))
        yield site
    finally:
        site.workers.stop()


def test_kill_middle_worker_while_four_requests_decode(site: Site) -> None:
    prompts = [[4 + i, 60 + 3 * i, 8] for i in range(4)]
    arrivals: dict[int, list[float]] = {i: [] for i in range(4)}
    killed_at: list[float] = []
    decoding = asyncio.Event()

    async def one(index: int) -> RequestFinished:
        def on_token(token: TokenGenerated) -> None:
            arrivals[index].append(time.monotonic())
            if min(len(a) for a in arrivals.values()) >= 5:
                decoding.set()

        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id=f"k{index}", reply_to=client,  # type: ignore[arg-type]
                                   token_ids=tuple(prompts[index]), max_new_tokens=40)  # fmt: skip
        result = await request(ClientOptions(site.settings, timeout_s=60), make, on_token)
        assert isinstance(result, RequestFinished)
        return result

    async def scenario() -> list[RequestFinished]:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(i)) for i in range(4)]
            async with asyncio.timeout(30):
                await decoding.wait()
            site.workers.signal("rsu", signal.SIGKILL)
            killed_at.append(time.monotonic())
            # What the orchestrator does on NodeDown: re-plan around the dead node.
            plan = make_plan(2, "car", AROUND_RSU, site.settings.plan_signing_key)
            answers = await two_phase(site.settings, plan)
            assert set(answers.values()) == {"ready"}, answers
        return [task.result() for task in tasks]

    results = asyncio.run(scenario())
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == site.local.generate(prompt, 40).token_ids
    resumed = [min(t for t in times if t > killed_at[0]) for times in arrivals.values()]
    assert max(resumed) - killed_at[0] < 3.5, max(resumed) - killed_at[0]
    assert "fail over" in site.workers.log_tail("car", 400)


def test_no_new_plan_fails_typed_before_the_deadline(site: Site) -> None:
    async def scenario() -> None:
        started = asyncio.Event()

        def on_token(token: TokenGenerated) -> None:
            if token.index >= 2:
                started.set()

        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id="lonely", reply_to=client, token_ids=(9, 9, 9),  # type: ignore[arg-type]
                                   max_new_tokens=200)  # fmt: skip

        task = asyncio.create_task(request(ClientOptions(site.settings, timeout_s=40), make, on_token))
        async with asyncio.timeout(20):
            await started.wait()
        site.workers.signal("mec", signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(ServingError, match="no new plan"):
            await task
        assert time.monotonic() - began < 15  # the failover wait (10 s), not the 40 s deadline

    asyncio.run(scenario())


def test_every_frame_delivered_twice_changes_nothing(broker: LocalBroker, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    site = Site(broker, tmp_path)
    site.workers.extra_env = {"EDGESPLIT_DUPLICATE_FRAMES": "true"}
    try:
        for node, trust in (("car", "2"), ("rsu", "1"), ("mec", "0")):
            site.workers.start(node, "--trust", trust)
        key = site.settings.plan_signing_key
        assert not asyncio.run(publish_plan(site.settings, make_plan(1, "car", PLAN_1, key)))
        for index, prompt in enumerate(([1, 2, 3], [50, 60, 70, 80])):
            def make(client: str, prompt: list[int] = prompt, index: int = index) -> GenerateRequest:
                return GenerateRequest(request_id=f"dup{index}", reply_to=client,  # type: ignore[arg-type]
                                       token_ids=tuple(prompt), max_new_tokens=24)  # fmt: skip

            result = asyncio.run(request(ClientOptions(site.settings, timeout_s=60), make))
            assert isinstance(result, RequestFinished)
            assert result.token_ids == site.local.generate(prompt, 24).token_ids
    finally:
        site.workers.stop()
    # Each step was accepted once: the copies were counted and dropped (logged at exit).
    for node in ("rsu", "mec", "car"):
        assert "frames_duplicate" in site.workers.log_tail(node, 50), site.workers.log_tail(node)
