"""Distributed inference over a real Mosquitto with real worker processes (tiny models).

Three workers (car, rsu, mec) hold segments [0,1) [1,3) [3,4) of a 4-block checkpoint;
`car` is the entry. Answers must equal the in-process split run with the same cuts.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import msgpack
import numpy as np
import pytest
import torch

from services.cli.client import Client, ClientOptions, request
from services.cli.streams import TokenStream
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.errors import Busy, ConfigError, ContextTooLong, NoAnswer
from shared.frame_headers import ActivationHeader
from shared.messages import (
    EmbeddingReady,
    EmbedRequest,
    GenerateRequest,
    RequestFinished,
    TokenGenerated,
)
from shared.model.pipeline import LocalPipeline
from shared.model.sampling import SamplingParams
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.tensor_frame import encode_frame
from shared.topics import FINISHED
from tests.integration.cluster import WorkerCluster, make_plan, publish_plan, settings_for

pytestmark = pytest.mark.integration
SPLITS = (1, 3)
SEGMENTS = (("car", 0, 1), ("rsu", 1, 3), ("mec", 3, 4))
EDGESPLIT = [sys.executable, "-m", "services.cli"]
PROMPTS = [[5, 17, 42], [1, 2, 3, 4, 5, 6], [99], [250, 13, 7, 7, 7]]


class System:
    def __init__(self, architecture: str, broker: LocalBroker, cluster: str, root: Path) -> None:
        self.model_dir = write_tiny_checkpoint(architecture, root / "model", layers=4, seed=3)
        self.shards = root / "shards"
        write_shards(self.model_dir, self.shards)
        self.settings = settings_for(broker.url, cluster)
        self.workers = WorkerCluster(broker.url, cluster, self.shards, root)
        self.local = LocalPipeline(self.model_dir, SPLITS)

    def start(self) -> None:
        self.workers.start("car", "--trust", "2", "--max-in-flight", "8", "--max-queued-requests", "1")
        self.workers.start("rsu", "--trust", "1")
        self.workers.start("mec", "--trust", "0")
        plan = make_plan(1, "car", SEGMENTS, self.settings.plan_signing_key)
        rejected = asyncio.run(publish_plan(self.settings, plan))
        assert not rejected, {node: self.workers.log_tail(node) for node in rejected}

    def options(self, timeout_s: float = 30.0) -> ClientOptions:
        return ClientOptions(self.settings, timeout_s=timeout_s)


def _system(architecture: str, broker: LocalBroker, root: Path) -> Iterator[System]:
    system = System(architecture, broker, f"it{architecture}", root)
    torch.set_num_threads(1)
    try:
        system.start()
        yield system
    finally:
        system.workers.stop()


@pytest.fixture(scope="module")
def llama(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    yield from _system("llama", broker, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    yield from _system("gpt2", broker, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def bert(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    yield from _system("bert", broker, tmp_path_factory.mktemp("bert"))


def _generate(system: System, prompt: list[int], tokens: int, **sampling: object) -> RequestFinished:
    def make(client: str) -> GenerateRequest:
        return GenerateRequest(request_id=f"r{abs(hash((tuple(prompt), client))) % 10**12}",  # type: ignore[arg-type]
                               reply_to=client, token_ids=tuple(prompt), max_new_tokens=tokens,
                               **sampling)  # type: ignore[arg-type]  # fmt: skip

    result = asyncio.run(request(system.options(), make))
    assert isinstance(result, RequestFinished)
    return result


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_equals_local_split(name: str, request_fixture: pytest.FixtureRequest) -> None:
    system: System = request_fixture.getfixturevalue(name)
    for prompt in PROMPTS:
        distributed = _generate(system, prompt, 32)
        local = system.local.generate(prompt, 32)
        assert distributed.token_ids == local.token_ids, prompt
    sampled = _generate(system, PROMPTS[0], 24, temperature=0.9, top_p=0.95, seed=11)
    local = system.local.generate(PROMPTS[0], 24, SamplingParams(0.9, 0.95, 11))
    assert sampled.token_ids == local.token_ids
    assert len(set(sampled.token_ids)) > 1  # sampling makes the comparison non-trivial


def test_each_finished_generation_is_published_once_more_for_the_orchestrator(llama: System) -> None:
    """The orchestrator calibrates on `requests/finished`, not on every client's tokens;
    that copy carries counts and timings only: no prompt, no generated tokens or text
    (issue #17, item 5). The client's own reply has them."""
    prompt = "the secret route of the ambulance"

    async def scenario() -> tuple[RequestFinished, list[RequestFinished]]:
        async with Bus(llama.settings) as bus, bus.subscribe(FINISHED) as finished:
            result = await request(llama.options(), lambda client: GenerateRequest(
                request_id="fin1", reply_to=client, prompt=prompt, max_new_tokens=6))  # type: ignore[arg-type]  # fmt: skip
            seen: list[RequestFinished] = []
            async with asyncio.timeout(10):
                while not seen or seen[-1].request_id != "fin1":
                    seen.append((await finished.get()).message)
            assert isinstance(result, RequestFinished)
            return result, seen

    result, seen = asyncio.run(scenario())
    assert [m.request_id for m in seen if m.request_id == "fin1"] == ["fin1"]
    prompt_ids = llama.local.tokenizer.encode(prompt)
    assert result.token_ids == llama.local.generate(prompt_ids, 6).token_ids
    assert result.text and result.text == llama.local.tokenizer.decode(list(result.token_ids))
    copy = seen[-1]
    assert copy.token_ids == () and copy.text == "" and copy.token_count == len(result.token_ids)
    assert copy == result.without_content() and copy.generated_tokens == result.generated_tokens
    wire = copy.model_dump_json()
    assert prompt not in wire and "ambulance" not in wire and result.text not in wire


def test_embed_equals_local_split(bert: System) -> None:
    for text in ("edge split inference", "a road side unit talks to a car"):
        def make(client: str, text: str = text) -> EmbedRequest:
            return EmbedRequest(request_id="e1", reply_to=client, text=text)  # type: ignore[arg-type]

        result = asyncio.run(request(bert.options(), make))
        assert isinstance(result, EmbeddingReady)
        local = bert.local.embed(bert.local.tokenizer.encode(text))
        assert np.allclose(result.embedding, local, atol=1e-5)
        assert abs(np.linalg.norm(result.embedding) - 1.0) < 1e-5


def test_client_library_streams_the_unsplit_greedy_tokens(llama: System) -> None:
    """`Client.generate` from Python (no argparse): three generations at once on one
    connection stream each token once, in order, equal to the unsplit local model's."""

    async def drain(stream: TokenStream) -> tuple[list[TokenGenerated], RequestFinished | None]:
        tokens = [token async for token in stream]
        return tokens, stream.result

    async def scenario() -> list[tuple[list[TokenGenerated], RequestFinished | None]]:
        async with Client(options=llama.options()) as client:
            with pytest.raises(ConfigError, match="max_new_tokens"):
                client.generate(PROMPTS[0], max_new_tokens=0)
            streams = [client.generate(prompt, max_new_tokens=20) for prompt in PROMPTS[:3]]
            answers = list(await asyncio.gather(*(drain(stream) for stream in streams)))
            again = await client.generate(PROMPTS[3], max_new_tokens=8).collect()
            return [*answers, ([], again)]

    answers = asyncio.run(scenario())
    unsplit = LocalPipeline(llama.model_dir)
    for prompt, (tokens, finished) in zip(PROMPTS[:3], answers, strict=False):
        want = unsplit.generate(prompt, 20).token_ids
        assert [token.token_id for token in tokens] == list(want), prompt
        assert [token.index for token in tokens] == list(range(len(want)))
        assert finished is not None and finished.token_ids == want
    assert answers[3][1] is not None and answers[3][1].token_ids == unsplit.generate(PROMPTS[3], 8).token_ids


def test_client_library_embeds_like_the_local_model(bert: System) -> None:
    async def scenario() -> tuple[float, ...]:
        async with Client(options=bert.options()) as client:
            return await client.embed("edge split inference")

    local = bert.local.embed(bert.local.tokenizer.encode("edge split inference"))
    assert np.allclose(asyncio.run(scenario()), local, atol=1e-5)


def test_eight_concurrent_requests_a_ninth_waits_and_a_tenth_is_busy(llama: System) -> None:
    """The entry runs 8 at once and lets 1 wait (``--max-queued-requests 1``): of ten sent
    at once, one is refused busy at once and nine complete exactly (the burst arrives
    well within one 48-token generation)."""
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(10)]

    async def one(prompt: list[int]) -> RequestFinished | Exception:
        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id=f"c{prompt[0]}", reply_to=client,  # type: ignore[arg-type]
                                   token_ids=tuple(prompt), max_new_tokens=48)  # fmt: skip
        try:
            return await request(llama.options(), make)  # type: ignore[return-value]
        except Busy as error:
            return error

    async def all_at_once() -> list[RequestFinished | Exception]:
        return await asyncio.gather(*(one(prompt) for prompt in prompts))

    results = asyncio.run(all_at_once())
    busy = [r for r in results if isinstance(r, Busy)]
    finished = {tuple(p): r for p, r in zip(prompts, results, strict=True) if isinstance(r, RequestFinished)}
    assert len(busy) == 1 and len(finished) == 9, results
    assert "1 waiting (the bounds 8 and 1)" in str(busy[0])
    for prompt, result in finished.items():
        assert result.token_ids == llama.local.generate(list(prompt), 48).token_ids


def test_prompt_longer_than_context_gets_a_typed_error(llama: System) -> None:
    too_long = [5] * (llama.local.config.max_positions + 1)

    def make(client: str) -> GenerateRequest:
        return GenerateRequest(request_id="long1", reply_to=client, token_ids=tuple(too_long),  # type: ignore[arg-type]
                               max_new_tokens=4)  # fmt: skip

    with pytest.raises(ContextTooLong):
        asyncio.run(request(llama.options(), make))


def test_malformed_payloads_are_dropped_and_workers_keep_serving(llama: System, broker: LocalBroker) -> None:
    root = f"edgesplit/{llama.settings.cluster}"
    good_shape_bad_values = encode_frame(
        ActivationHeader(request_id="x1", step=0, epoch=1, seq=0, target=1, pos=0, last_only=False, pass_id=1),  # type: ignore[arg-type]
        np.zeros((2, 7), np.float32),  # wrong hidden size
    )
    wrong_target = encode_frame(
        ActivationHeader(request_id="x2", step=0, epoch=1, seq=0, target=2, pos=0, last_only=False, pass_id=1),  # type: ignore[arg-type]
        np.zeros((1, 64), np.float32),
    )
    nan_values = encode_frame(
        ActivationHeader(request_id="x3", step=0, epoch=1, seq=0, target=1, pos=0, last_only=False, pass_id=1),  # type: ignore[arg-type]
        np.full((1, 64), np.nan, np.float32),
    )
    past_context = encode_frame(
        ActivationHeader(request_id="x4", step=0, epoch=1, seq=0, target=1, pos=10**6, last_only=False, pass_id=1),  # type: ignore[arg-type]
        np.zeros((1, 64), np.float32),
    )
    garbage = [b"", b"\x00\xff" * 50, msgpack.packb({"v": 1, "kind": "Plan", "body": {"epoch": -1}}),
               msgpack.packb([1, 2, 3]), b"ESF2\xff\xff\xff\xff", good_shape_bad_values, wrong_target,
               nan_values, past_context]  # fmt: skip
    topics = [f"{root}/plan/current", f"{root}/epoch/commands"]
    for node in ("car", "rsu", "mec"):
        topics += [f"{root}/nodes/{node}/activations", f"{root}/nodes/{node}/requests",
                   f"{root}/epoch/acks/{node}"]  # fmt: skip

    async def spray() -> None:
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            for topic in topics:
                for payload in garbage:
                    await client.publish(topic, payload, qos=1)

    asyncio.run(spray())
    for node, process in llama.workers.processes.items():
        assert process.poll() is None, llama.workers.log_tail(node)
    assert _generate(llama, PROMPTS[1], 16).token_ids == llama.local.generate(PROMPTS[1], 16).token_ids
    log = llama.workers.log_tail("rsu", 400)
    assert "dropped malformed" in log
    assert "frame of x3 dropped: activation frame holds 64 NaN or infinite values" in log
    assert "frame of x4 dropped: activation frame covers positions 1000000..1000000" in log


def test_cli_generate_through_the_broker_equals_local(llama: System, broker: LocalBroker) -> None:
    common = ["--prompt-ids", "7,8,9", "--max-new-tokens", "12", "--json"]
    remote = subprocess.run([*EDGESPLIT, "generate", "--broker", broker.url, *common],
                            capture_output=True, text=True, timeout=60,
                            env=_env(llama.settings.cluster))  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    local = subprocess.run([*EDGESPLIT, "generate", "--local", "--model", str(llama.model_dir),
                            "--splits", "1,3", *common], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert local.returncode == 0, local.stderr
    got, want = json.loads(remote.stdout.splitlines()[-1]), json.loads(local.stdout.splitlines()[-1])
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    assert got["ttft_s"] > 0 and got["tpot_s"] > 0


def test_client_without_a_system_fails_in_one_line(broker: LocalBroker) -> None:
    result = subprocess.run([*EDGESPLIT, "generate", "--broker", broker.url, "--prompt", "hi"],
                            capture_output=True, text=True, timeout=30, env=_env("nobodyhere"))  # fmt: skip
    assert result.returncode == 1
    assert "no plan published" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_answer_is_a_typed_error(llama: System) -> None:
    llama.workers.signal("car", 19)  # SIGSTOP: the entry cannot answer
    try:
        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id="stall1", reply_to=client, token_ids=(1, 2),  # type: ignore[arg-type]
                                   max_new_tokens=2)  # fmt: skip

        with pytest.raises(NoAnswer):
            asyncio.run(request(llama.options(timeout_s=2.0), make))
    finally:
        llama.workers.signal("car", 18)  # SIGCONT


def _env(cluster: str) -> dict[str, str]:
    import os

    return {**os.environ, "EDGESPLIT_CLUSTER": cluster}


@pytest.fixture
def request_fixture(request: pytest.FixtureRequest) -> pytest.FixtureRequest:
    return request
