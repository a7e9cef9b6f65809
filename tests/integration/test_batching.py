"""Continuous batching through real worker processes on a real Mosquitto (tiny llama).

Three workers (car, rsu, mec) hold [0,1) [1,3) [3,4); `car` is the entry. Eight requests
of different prompt lengths and lengths of output run at once: every token must equal
the unsplit model's, and the workers' telemetry must show decode steps that ran batched
(`Telemetry.decode_batches`, services/worker/batching.py) and that crossed each hop in
batch frames (`Telemetry.batched_frames_sent`, services/worker/batch_frames.py: car ->
rsu and rsu -> mec activations, mec -> car results). A request whose deadline ends in
the middle of its stream fails alone: the others of its batches keep the unsplit tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.cli.client import ClientOptions, request
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.errors import StageTimedOut
from shared.messages import GenerateRequest, RequestFinished
from shared.model.pipeline import LocalPipeline
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.topics import TELEMETRY
from tests.integration.cluster import WorkerCluster, make_plan, publish_plan, settings_for

pytestmark = pytest.mark.integration
SEGMENTS = (("car", 0, 1), ("rsu", 1, 3), ("mec", 3, 4))
NODES = [node for node, _, _ in SEGMENTS]
# different prompt lengths and output lengths: requests join and leave the batch
PROMPTS = [[5 + i] * (1 + (7 * i) % 11) + [40 + i] for i in range(8)]
NEW_TOKENS = [24 + 6 * (i % 4) for i in range(8)]
SLOWDOWN = "30"


@pytest.fixture(scope="module")
def system(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerCluster, object, Path]]:
    root = tmp_path_factory.mktemp("batching")
    model = write_tiny_checkpoint("llama", root / "model", layers=4, seed=3)
    write_shards(model, root / "shards")
    settings = settings_for(broker.url, "itbatch")
    workers = WorkerCluster(broker.url, "itbatch", root / "shards", root)
    torch.set_num_threads(1)
    try:
        # a tiny block computes in well under a millisecond, less than a hop: slowed down,
        # each stage computes for longer than frames take to arrive, as real blocks do, so
        # steps queue behind the compute thread (no stage waits to fill a batch)
        workers.start("car", "--trust", "2", "--max-in-flight", "16", "--slowdown", SLOWDOWN)
        workers.start("rsu", "--trust", "1", "--slowdown", SLOWDOWN)
        workers.start("mec", "--trust", "0", "--slowdown", SLOWDOWN)
        plan = make_plan(1, "car", SEGMENTS, settings.plan_signing_key)
        rejected = asyncio.run(publish_plan(settings, plan))
        assert not rejected, {node: workers.log_tail(node) for node in rejected}
        yield workers, settings, model
    finally:
        workers.stop()


Counts = tuple[int, int, int, int]
"""A worker's (decode_batches, decode_batched_steps, batched_frames_sent, batched_frames_rows)."""


async def _batches(settings: object, timeout_s: float = 20.0) -> dict[str, Counts]:
    """Each worker's `Counts` from its telemetry, once every worker reported after the
    run with batch frames sent (or after ``timeout_s``)."""
    counts: dict[str, Counts] = {}
    async with Bus(settings) as bus, bus.subscribe(TELEMETRY) as telemetry:  # type: ignore[arg-type]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while len(counts) < len(NODES) or min(min(c[0], c[2]) for c in counts.values()) == 0:
                    _, report = await telemetry.get()
                    counts[report.node] = max(counts.get(report.node, (0, 0, 0, 0)), (
                        report.decode_batches, report.decode_batched_steps,
                        report.batched_frames_sent, report.batched_frames_rows))  # fmt: skip
    return counts


def test_concurrent_requests_batch_at_every_stage_and_keep_the_unsplit_tokens(system: tuple) -> None:
    workers, settings, model = system

    async def one(index: int) -> RequestFinished:
        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id=f"batch{index}", reply_to=client,  # type: ignore[arg-type]
                                   token_ids=tuple(PROMPTS[index]), max_new_tokens=NEW_TOKENS[index])  # fmt: skip

        result = await request(ClientOptions(settings, timeout_s=120.0), make)  # type: ignore[arg-type]
        assert isinstance(result, RequestFinished), result
        return result

    async def scenario() -> tuple[list[RequestFinished], dict[str, Counts]]:
        results = await asyncio.gather(*(one(index) for index in range(len(PROMPTS))))
        return list(results), await _batches(settings)

    results, batches = asyncio.run(scenario())
    print("(decode batches, their steps, batch frames sent, their rows) per node:", batches)
    unsplit = LocalPipeline(model)
    for prompt, tokens, result in zip(PROMPTS, NEW_TOKENS, results, strict=True):
        assert result.token_ids == unsplit.generate(prompt, tokens, stop_at_eos=True).token_ids
    assert set(batches) == set(NODES), {node: workers.log_tail(node) for node in NODES}
    for forwards, steps, frames, rows in batches.values():
        # eight streams share each stage: many decode steps ran two or more at a time,
        # and left for the next hop (or, from mec, back to car) two or more per frame
        assert forwards > 0 and steps >= 2 * forwards, batches
        assert frames > 0 and rows >= 2 * frames, batches


def test_a_request_cancelled_mid_batch_does_not_break_the_others(system: tuple) -> None:
    """Six streams and one whose 1.5 s deadline ends mid-stream (its serving task is
    cancelled inside a batched step at the entry while its frames are in flight): it
    fails as a timeout, the six finish with the unsplit tokens."""
    workers, settings, model = system

    async def one(index: int, deadline_s: float | None = None) -> RequestFinished:
        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id=f"cut{index}", reply_to=client,  # type: ignore[arg-type]
                                   token_ids=tuple(PROMPTS[index]), timeout_s=deadline_s or 120.0,
                                   max_new_tokens=200 if deadline_s else NEW_TOKENS[index])  # fmt: skip

        result = await request(ClientOptions(settings, timeout_s=120.0), make)  # type: ignore[arg-type]
        assert isinstance(result, RequestFinished), result
        return result

    async def scenario() -> list[RequestFinished | BaseException]:
        return list(await asyncio.gather(*(one(index) for index in range(6)), one(7, deadline_s=1.5),
                                         return_exceptions=True))  # fmt: skip

    *finished, cut = asyncio.run(scenario())
    assert isinstance(cut, StageTimedOut), cut
    unsplit = LocalPipeline(model)
    for index, result in enumerate(finished):
        assert isinstance(result, RequestFinished), (result, {node: workers.log_tail(node) for node in NODES})
        assert result.token_ids == unsplit.generate(PROMPTS[index], NEW_TOKENS[index], stop_at_eos=True).token_ids
