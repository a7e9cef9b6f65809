"""A plan's per-link activation precision, through three real workers on a real Mosquitto.

The plan car [0,1) -> rsu [1,3) -> mec [3,4) -> car names int8 for the frames entering
block 3 (rsu -> mec) and nothing for the other hops. The workers run with their default
``--activation-precision fp32``, so only that hop may compress. A sniffer on the broker
reads every activation frame: the ones into mec are int8 with a scale per row, the rest
float32. Greedy tokens equal the same model run in one process with the same int8 round
trip on the activation entering block 3 (``LocalPipeline(activation_precisions=...)``),
and that run's logits differ from the exact one's (the compression really happened).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator

import aiomqtt
import numpy as np
import pytest
import torch

from services.cli.client import ClientOptions
from services.cli.client import request as client_request
from shared.broker import LocalBroker
from shared.errors import DecodeError
from shared.frame_headers import ActivationHeader, ResultHeader
from shared.messages import GenerateRequest, LinkPrecision, RequestFinished
from shared.model.pipeline import LocalPipeline
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.tensor_frame import decode_frame
from tests.integration.cluster import WorkerCluster, make_plan, publish_plan, settings_for

pytestmark = pytest.mark.integration
SEGMENTS = (("car", 0, 1), ("rsu", 1, 3), ("mec", 3, 4))
PROMPTS = [[5, 17, 42], [1, 2, 3, 4, 5, 6], [250, 13, 7, 7, 7]]
CLUSTER = "planprec"


class Sniffer:
    """Counts the dtype of every activation and result frame on the broker, by receiver."""

    def __init__(self, broker: LocalBroker) -> None:
        self.broker, self.ready = broker, asyncio.Event()
        self.seen: Counter[tuple[str, str, str]] = Counter()  # (receiver, kind, dtype)

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.broker.port) as client:
            await client.subscribe(f"edgesplit/{CLUSTER}/nodes/+/activations")
            self.ready.set()
            async for message in client.messages:
                with contextlib.suppress(DecodeError):
                    header, array = decode_frame(bytes(message.payload))  # type: ignore[arg-type]
                    if isinstance(header, ActivationHeader | ResultHeader) and array.size:
                        kind = type(header).__name__
                        self.seen[(str(message.topic).split("/")[-2], kind, str(array.dtype))] += 1


@pytest.fixture(scope="module")
def system(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plan-precisions")
    model_dir = write_tiny_checkpoint("llama", root / "model", layers=4, seed=3)
    write_shards(model_dir, root / "shards")
    settings = settings_for(broker.url, CLUSTER)
    workers = WorkerCluster(broker.url, CLUSTER, root / "shards", root)
    try:
        for node, trust in (("car", "2"), ("rsu", "1"), ("mec", "0")):
            workers.start(node, "--trust", trust)
        plan = make_plan(1, "car", SEGMENTS, settings.plan_signing_key).model_copy(
            update={"link_precisions": (LinkPrecision(target=3, activations="int8"),)}
        ).sign(settings.plan_signing_key)
        rejected = asyncio.run(publish_plan(settings, plan))
        assert not rejected, {node: workers.log_tail(node) for node in rejected}
        yield settings, model_dir
    finally:
        workers.stop()


async def _generate_and_sniff(settings, broker: LocalBroker) -> tuple[list[tuple[int, ...]], Counter]:
    sniffer = Sniffer(broker)
    task = asyncio.create_task(sniffer.run())
    try:
        async with asyncio.timeout(30):
            await sniffer.ready.wait()
        answers = []
        for index, prompt in enumerate(PROMPTS):
            def make(client: str, prompt: list[int] = prompt, index: int = index) -> GenerateRequest:
                return GenerateRequest(request_id=f"p{index}", reply_to=client,  # type: ignore[arg-type]
                                       token_ids=tuple(prompt), max_new_tokens=16)  # fmt: skip

            result = await client_request(ClientOptions(settings, timeout_s=60.0), make)  # type: ignore[arg-type]
            assert isinstance(result, RequestFinished), result
            answers.append(result.token_ids)
        await asyncio.sleep(0.5)  # QoS 0 frames the sniffer may still be reading
        return answers, sniffer.seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


def test_the_plan_names_int8_on_one_link_and_only_that_link_carries_int8(system, broker) -> None:
    settings, model_dir = system
    answers, seen = asyncio.run(_generate_and_sniff(settings, broker))
    compressed = LocalPipeline(model_dir, (1, 3), activation_precisions={3: "int8"})
    exact = LocalPipeline(model_dir, (1, 3))
    moved = False
    for prompt, tokens in zip(PROMPTS, answers, strict=True):
        local = compressed.generate(prompt, 16)
        assert tokens == local.token_ids, prompt
        assert len(set(local.token_ids)) > 1  # not a degenerate comparison
        moved |= not torch.equal(compressed.logits(prompt), exact.logits(prompt))
    assert moved  # the int8 round trip changes the numbers: the reference is not the exact run
    into_mec = {dtype for (node, kind, dtype), count in seen.items() if node == "mec"}
    others = {dtype for (node, kind, dtype) in seen if node != "mec"}
    assert into_mec == {"int8"}, seen
    assert others == {"float32"}, seen
    assert seen[("mec", "ActivationHeader", "int8")] >= len(PROMPTS) * 16 // 2, seen


def test_local_reference_compresses_row_by_row() -> None:
    """The local reference's hop is the data plane's: int8 with a scale per row."""
    from shared.tensor_frame import compress_activation, decompress_activation

    rows = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    rows[1] *= 100
    restored = decompress_activation(compress_activation(rows, "int8"), 8)
    single = decompress_activation(compress_activation(rows[2:], "int8"), 8)
    assert np.array_equal(restored[2:], single)  # a last-row-only frame restores the same row
