"""A hostile broker client forges data-plane frames into live requests (issue #17, item 4).

Three real workers (car [0,1) entry, rsu [1,3), mec [3,4)) of a tiny llama on a real
Mosquitto in the laptop profile (anonymous, no ACL), so the attacker reads every frame
header. For each genuine frame it sees it injects, as well as it can:

- the same header (request, step, epoch, pass, target, ``src``, even the ``mac``) with
  other values, and with the MAC stripped;
- the predicted next decode step (step + 1, pos + rows) ahead of the genuine one, and
  the next step's result for the entry;
- a release of the request's KV caches from the hop's genuine sender;
- kv frames that would overwrite the receiver's K/V of the request, and kv acks.

Without the epoch's frame key none authenticates: each request still finishes with the
tokens of the unsplit model, and the workers count the forged frames (``frames_forged``
in their telemetry, shown by `edgesplit status`).
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

from services.cli.client import request
from services.cli.system import collect_status
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.errors import DecodeError
from shared.frame_headers import (
    ActivationHeader,
    FrameHeader,
    KvAckHeader,
    KvHeader,
    ReleaseHeader,
    ResultHeader,
)
from shared.messages import GenerateRequest, RequestFinished
from shared.model.config import ModelConfig
from shared.tensor_frame import decode_frame, encode_frame
from shared.topics import TELEMETRY
from tests.integration.test_distributed import SEGMENTS, System

pytestmark = pytest.mark.integration
PROMPTS = [[5, 17, 42], [250, 13, 7, 7, 7]]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def llama(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    system = System("llama", broker, "itforge", tmp_path_factory.mktemp("forge"))
    torch.set_num_threads(1)
    try:
        system.start()
        yield system
    finally:
        system.workers.stop()


def forgeries(header: FrameHeader, array: np.ndarray, node: str, config: ModelConfig,
              rng: np.random.Generator) -> list[tuple[str, bytes]]:  # fmt: skip
    """The frames the attacker injects after seeing ``header`` on its way to ``node``:
    (destination node, payload)."""
    out: list[tuple[str, bytes]] = []

    def poison(shape: tuple[int, ...]) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    if isinstance(header, ActivationHeader | ResultHeader) and array.size:
        out.append((node, encode_frame(header, poison(array.shape))))  # genuine header, mac and all
        out.append((node, encode_frame(header.model_copy(update={"mac": b""}), poison(array.shape))))
        ahead = {"step": header.step + 1, "seq": header.seq + 1}
        if isinstance(header, ActivationHeader):
            ahead["pos"] = header.pos + array.shape[0]
        out.append((node, encode_frame(header.model_copy(update=ahead), poison((1, array.shape[1])))))
    if isinstance(header, ActivationHeader):
        empty = np.zeros((0, config.hidden_size), np.float32)
        release = ReleaseHeader(request_id=header.request_id, step=0, epoch=header.epoch, seq=header.seq,
                                target=header.target, src=header.src, sent_at=header.sent_at)  # fmt: skip
        out.append((node, encode_frame(release, empty)))
        end = next(e for n, s, e in SEGMENTS if s == header.target)
        tokens = header.pos + array.shape[0]
        blocks = tuple(range(header.target, end))
        kv = KvHeader(request_id=header.request_id, step=header.step, epoch=header.epoch, seq=header.seq,
                      target=header.target, blocks=blocks, pos=tokens, ack_step=header.step,
                      old_epoch=header.epoch, pass_id=header.pass_id, src=header.src)  # fmt: skip
        shape = (len(blocks), 2, config.num_kv_heads, tokens, config.head_dim)
        out.append((node, encode_frame(kv, poison(shape))))
        ack = KvAckHeader(request_id=header.request_id, step=header.step + 1, epoch=header.epoch,
                          seq=header.seq, pass_id=header.pass_id, src=node)  # type: ignore[arg-type]  # fmt: skip
        out.append(("car", encode_frame(ack, empty)))
    return out


class Attacker:
    """An anonymous broker client that forges frames from the headers it reads."""

    def __init__(self, broker: LocalBroker, cluster: str, config: ModelConfig) -> None:
        self.broker, self.root, self.config = broker, f"edgesplit/{cluster}", config
        self.ready = asyncio.Event()
        self.sent: Counter[str] = Counter()
        self._mine: set[bytes] = set()

    async def run(self) -> None:
        rng = np.random.default_rng(7)
        async with aiomqtt.Client("127.0.0.1", self.broker.port) as client:
            await client.subscribe(f"{self.root}/nodes/+/activations")
            self.ready.set()
            async for message in client.messages:
                payload = bytes(message.payload)  # type: ignore[arg-type]
                if payload in self._mine:
                    continue  # its own forgery, read back
                with contextlib.suppress(DecodeError):
                    header, array = decode_frame(payload)
                    node = str(message.topic).split("/")[-2]
                    for destination, forged in forgeries(header, array, node, self.config, rng):
                        self._mine.add(forged)
                        await client.publish(f"{self.root}/nodes/{destination}/activations", forged)
                        self.sent[destination] += 1


async def stop(task: asyncio.Task[None], deadline_s: float = 15.0) -> None:
    """Cancel ``task`` until it is done. One cancel is not enough: on Python 3.11
    `asyncio.wait_for` (inside aiomqtt's publish, awaiting the broker's confirmation)
    returns the result instead of raising when the confirmation and the cancellation
    arrive in the same loop iteration, so the cancellation is lost and the attacker
    loops on forever (this test hung in 2 of 8 runs at load average about 11, the event loop idle in
    ``select`` after both requests had finished)."""
    async with asyncio.timeout(deadline_s):
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


async def _forged_counts(system: System, at_least: int, timeout_s: float = 15.0) -> dict[str, int]:
    """Each worker's ``frames_forged`` from its telemetry, once they add up to ``at_least``
    and every worker counted some (or after ``timeout_s``)."""
    counts: dict[str, int] = {}
    async with Bus(system.settings) as bus, bus.subscribe(TELEMETRY) as telemetry:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while sum(counts.values()) < at_least or min(counts.values(), default=0) == 0 or len(counts) < 3:
                    _, report = await telemetry.get()
                    counts[report.node] = max(counts.get(report.node, 0), report.frames_forged)
    return counts


def test_forged_activation_kv_and_release_frames_change_no_token(llama: System, broker: LocalBroker) -> None:
    attacker = Attacker(broker, llama.settings.cluster, llama.local.config)

    async def scenario() -> list[RequestFinished]:
        spy = asyncio.create_task(attacker.run())
        try:
            async with asyncio.timeout(10):
                await attacker.ready.wait()
            results = []
            for index, prompt in enumerate(PROMPTS):
                def make(client: str, prompt: list[int] = prompt, index: int = index) -> GenerateRequest:
                    return GenerateRequest(request_id=f"forge{index}", reply_to=client,  # type: ignore[arg-type]
                                           token_ids=tuple(prompt), max_new_tokens=NEW_TOKENS)  # fmt: skip

                result = await request(llama.options(timeout_s=60), make)
                assert isinstance(result, RequestFinished)
                results.append(result)
            return results
        finally:
            await stop(spy)

    results = asyncio.run(scenario())
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == llama.local.generate(prompt, NEW_TOKENS).token_ids, prompt
    sent = sum(attacker.sent.values())
    assert sent >= 6 * NEW_TOKENS, attacker.sent  # it saw the live frames and forged
    counts = asyncio.run(_forged_counts(llama, at_least=sent // 2))
    print("forged frames sent:", dict(attacker.sent), "counted as forged:", counts)
    assert sum(counts.values()) >= sent // 2, (attacker.sent, counts)
    assert all(counts.get(node, 0) > 0 for node in ("car", "rsu", "mec")), counts
    assert "dropped a forged frame" in llama.workers.log_tail("rsu", 400)
    status = asyncio.run(collect_status(llama.settings, 2.5))  # what `edgesplit status --json` prints
    assert sum(status["frames_forged"].values()) > 0, status["frames_forged"]
