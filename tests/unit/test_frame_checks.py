"""Frames a worker must refuse before it computes: two real data planes, wired in-process.

Node ``a`` is the entry and runs blocks [0, 2) of a tiny llama; node ``b`` runs [2, 4).
Frames from one to the other go through `encode_frame`/`decode_frame`, as over MQTT.
Each hostile frame (NaN or infinite values, a position or token count past the context,
a wrong shape or dtype, a kv frame for blocks elsewhere) is refused with FrameRefused and
counted as ``frames_refused``; nothing is computed or cached for it, and the pipeline
then serves a pass whose result equals the unsplit model's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from services.worker.compute import ComputeThread, SegmentHost, Slowdown
from services.worker.dataplane import DataPlane, FrameLimits
from services.worker.epochs import EpochKeeper, Serving
from services.worker.errors import FrameRefused
from shared.frame_headers import (
    ActivationHeader,
    BatchHeader,
    FrameHeader,
    HandoffHeader,
    KvAckHeader,
    KvHeader,
    ReleaseHeader,
    ResultHeader,
)
from shared.model.checkpoint import Checkpoint
from shared.model.runtime import EntryRuntime
from shared.model.tiny import write_tiny_checkpoint
from shared.planning.route import Route
from shared.security.frame_keys import PeerKeys
from shared.tensor_frame import Frame, decode_frame, encode_frame

ROUTE = Route(epoch=1, entry="a", num_layers=4, segments=(("a", 0, 2), ("b", 2, 4)))
PROMPT = np.array([5, 9, 17, 33], np.int64)
KEY = bytes(range(32))
"""Epoch 1's frame key (both nodes hold it)."""
PEERS = {node: PeerKeys(node) for node in ("a", "b", "c")}
"""Each node's X25519 key: a and b run the pair; c is a worker outside the route that
holds the epoch key too (a compromised member of the cluster). Each knows the others'."""
for _peers in PEERS.values():
    for _node, _other in PEERS.items():
        _peers.learn(_node, _other.public_hex)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return Checkpoint(write_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), layers=4, seed=3))


class _Entry:
    """The entry's embedding (what `DataPlane.pipeline_pass` needs of `EntryRole`)."""

    def __init__(self, source: Checkpoint) -> None:
        self.runtime = EntryRuntime(source)

    def embed_tokens(self, token_ids: np.ndarray, position: int) -> np.ndarray:
        return self.runtime.embed(torch.from_numpy(np.asarray(token_ids, np.int64)), position).numpy()


Tamper = Callable[[Frame], list[Frame]]


@dataclass
class Pair:
    """Nodes a and b; ``tamper_to_a`` turns each frame for a into the frames delivered."""

    a: DataPlane
    b: DataPlane
    host_b: SegmentHost
    refused: list[tuple[str, FrameRefused]] = field(default_factory=list)
    sent_by_b: list[tuple[str, Frame]] = field(default_factory=list)
    tamper_to_a: Tamper = staticmethod(lambda frame: [frame])  # type: ignore[assignment]
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def deliver(self, node: str, frame: Frame) -> None:
        """As the service does: a batch frame is opened, and its rows handled at once."""
        plane = self.a if node == "a" else self.b
        try:
            if not isinstance(frame.header, BatchHeader):
                await plane.on_frame(frame)
                return
            rows = await plane.open_batch(frame)
            await asyncio.gather(*(plane.on_frame(row, trusted=True) for row in rows))
        except FrameRefused as error:
            self.refused.append((node, error))

    def link(self, sender: str) -> Callable[[str, bytes], Awaitable[None]]:
        async def send(destination: str, payload: bytes) -> None:
            frame = Frame(*decode_frame(payload))
            if sender == "b":
                self.sent_by_b.append((destination, frame))
            frames = self.tamper_to_a(frame) if destination == "a" else [frame]
            for each in frames:  # in order, as one MQTT session delivers them
                task = asyncio.create_task(self.deliver(destination, each))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                await asyncio.sleep(0)

        return send


@pytest.fixture
def make_pair(source: Checkpoint) -> Iterator[Callable[[], Pair]]:
    threads: list[ComputeThread] = []

    def make() -> Pair:
        limits = FrameLimits.of(source.config)
        compute_a, compute_b = ComputeThread(), ComputeThread()
        threads.extend((compute_a, compute_b))
        keeper_a, keeper_b = EpochKeeper(), EpochKeeper()
        host_b = SegmentHost(source, 2, 4)
        keeper_a.prepare(Serving(ROUTE, SegmentHost(source, 0, 2), _Entry(source), KEY))  # type: ignore[arg-type]
        keeper_b.prepare(Serving(ROUTE, host_b, None, KEY))
        for keeper in (keeper_a, keeper_b):
            keeper.commit(1, time.monotonic())
        pair = Pair(a=None, b=None, host_b=host_b)  # type: ignore[arg-type]
        pair.a = DataPlane("a", limits, keeper_a, compute_a, Slowdown(), pair.link("a"), 10.0, peers=PEERS["a"])
        pair.b = DataPlane("b", limits, keeper_b, compute_b, Slowdown(), pair.link("b"), 10.0, peers=PEERS["b"])
        return pair

    yield make
    for thread in threads:
        thread.close()


def _reference(source: Checkpoint, last_only: bool = True) -> np.ndarray:
    """The unsplit model's final hidden state for PROMPT."""
    hidden = _Entry(source).embed_tokens(PROMPT, 0)
    host = SegmentHost(source, 0, 4)
    out = host.forward("ref", hidden, 0, Slowdown())
    return out[-1:] if last_only else out


def _activation(pos: int = 0, step: int = 0) -> ActivationHeader:
    return ActivationHeader(request_id="h1", step=step, epoch=1, seq=0, target=2, pos=pos,  # type: ignore[arg-type]
                            last_only=True, pass_id=1)  # fmt: skip


def _row(rows: int, value: float | None = None, at: tuple[int, int] = (0, 3)) -> np.ndarray:
    array = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
    if value is not None:
        array[at] = value
    return array


def sealed(header: FrameHeader, array: np.ndarray, src: str, key: bytes = KEY, to: str | None = None,
           by: str | None = None) -> Frame:  # fmt: skip
    """``header`` from ``src`` to ``to`` (a for b's frames, else b), as received over
    MQTT: authenticated with their pair key under the epoch key ``key``, computed by
    ``by``'s X25519 key (``src``'s by default; another node's is a forgery)."""
    to = to or ("a" if src == "b" else "b")
    sealer = PEERS.get(by or src) or PeerKeys(src)
    pair = sealer.key(key, src, to) or key
    return Frame(*decode_frame(encode_frame(header.model_copy(update={"src": src}), array, pair)))


async def _refuse(pair: Pair, node: str, header: FrameHeader, array: np.ndarray, match: str) -> None:
    """A frame from the plan's sender of that hop (so it authenticates) that is refused."""
    plane = pair.a if node == "a" else pair.b
    before = plane.counters["frames_refused"]
    src = "b" if node == "a" else "a"
    if isinstance(header, KvHeader):  # from the old owner of its blocks
        src = ROUTE.owner_of_block(header.blocks[0])
    with pytest.raises(FrameRefused, match=match):
        await plane.on_frame(sealed(header, array, src, to=node))
    assert plane.counters["frames_refused"] == before + 1


async def _pass_equals_reference(pair: Pair, source: Checkpoint, request_id: str = "good") -> None:
    hidden, epoch = await pair.a.pipeline_pass(request_id, 0, PROMPT, 0, last_only=True)
    assert epoch == 1 and hidden.shape == (1, 64)
    np.testing.assert_allclose(hidden, _reference(source), rtol=1e-5, atol=1e-5)


def test_activations_that_do_not_fit_are_refused_before_compute(
    make_pair: Callable[[], Pair], source: Checkpoint
) -> None:
    async def main() -> None:
        pair = make_pair()
        cases: list[tuple[ActivationHeader, np.ndarray, str]] = [
            (_activation(step=1), _row(1, NAN), "activation frame holds 1 NaN or infinite"),
            (_activation(step=2), _row(3, INF, (2, 63)), "activation frame holds 1 NaN or infinite"),
            (_activation(step=3), _row(2, -INF), "NaN or infinite"),
            (_activation(pos=255, step=4), _row(2), r"positions 255\.\.256: .*256-token context"),
            (_activation(pos=2**40, step=5), _row(1), "256-token context"),
            (_activation(step=6), _row(0), r"float32 \[T, 64\] with T >= 1"),
            (_activation(step=7), _row(1).astype(np.float64), r"float32 \[T, 64\]"),
            (_activation(step=8), _row(1)[:, :32].copy(), r"float32 \[T, 64\]"),
        ]
        for header, array, match in cases:
            await _refuse(pair, "b", header, array, match)
        assert pair.b.counters["frames_refused"] == len(cases)
        assert pair.host_b.requests() == 0  # nothing computed, no KV cache made
        assert pair.host_b.export_kv("h1") is None
        # the genuine frame with the key of a refused one is not taken for a duplicate
        await pair.b.on_frame(sealed(_activation(step=1), _row(1), "a"))
        assert pair.b.counters["frames_duplicate"] == 0 and pair.host_b.requests() == 1
        await _pass_equals_reference(pair, source)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_corrupt_result_copies_are_refused_and_the_genuine_result_is_used(
    make_pair: Callable[[], Pair], source: Checkpoint
) -> None:
    """Before b's genuine result reaches the entry, three corrupt copies of it do: NaN
    values, two rows for a last-only pass, a kv_missing result with values. Each is
    refused (not taken for the answer); the pass then completes with the genuine one."""

    def corrupt_first(frame: Frame) -> list[Frame]:
        if not isinstance(frame.header, ResultHeader):
            return [frame]
        nan = np.array(frame.array)
        nan[0, 0] = NAN
        two_rows = np.concatenate([frame.array, frame.array])
        missing = frame.header.model_copy(update={"kv_missing": True})
        return [Frame(frame.header, nan), Frame(frame.header, two_rows), Frame(missing, frame.array), frame]

    async def main() -> None:
        pair = make_pair()
        pair.tamper_to_a = corrupt_first
        await _pass_equals_reference(pair, source)
        await asyncio.gather(*pair.tasks)
        messages = [str(error) for node, error in pair.refused if node == "a"]
        assert len(messages) == 3, messages
        assert "result frame holds 1 NaN" in messages[0]
        assert "has 2 rows; its pass expects 1" in messages[1]
        assert "kv_missing result must be empty" in messages[2]
        assert pair.a.counters["frames_refused"] == 3
        assert pair.a.counters["results_unexpected"] == 0

        await _refuse(pair, "a", ResultHeader(request_id="z", step=0, epoch=1, seq=0, pass_id=9),  # type: ignore[arg-type]
                      _row(257), r"result must be float32 \[T or 1, 64\] with 1 <= T <= 256")  # fmt: skip
        await _refuse(pair, "a", ResultHeader(request_id="z", step=1, epoch=1, seq=0, pass_id=9),  # type: ignore[arg-type]
                      _row(1).astype(np.float64), r"result must be float32")  # fmt: skip

    asyncio.run(asyncio.wait_for(main(), 60))


def _kv(blocks: tuple[int, ...] = (2, 3), pos: int = 3, step: int = 0) -> KvHeader:
    return KvHeader(request_id="k1", step=step, epoch=1, seq=0, target=2, blocks=blocks, pos=pos,  # type: ignore[arg-type]
                    ack_step=7, old_epoch=1, pass_id=1)  # fmt: skip


def _kv_array(blocks: int = 2, tokens: int = 3, value: float | None = None, **shape: Any) -> np.ndarray:
    dims = {"blocks": blocks, "kv": 2, "heads": 2, "tokens": tokens, "dim": 16} | shape
    array = np.random.default_rng(1).standard_normal(tuple(dims.values())).astype(np.float32)
    if value is not None:
        array[1, 1, 0, tokens - 1, 5] = value
    return array


def test_kv_frames_that_do_not_fit_are_refused_before_import(make_pair: Callable[[], Pair]) -> None:
    async def main() -> None:
        pair = make_pair()
        cases: list[tuple[KvHeader, np.ndarray, str]] = [
            (_kv(step=1), _kv_array(value=NAN), "kv frame holds 1 NaN or infinite"),
            (_kv(step=2), _kv_array(value=INF), "kv frame holds 1 NaN or infinite"),
            (_kv(step=3), _kv_array().astype(np.float16), r"kv frame must be float32 \[2, 2, 2, 3, 16\]"),
            (_kv(step=4, pos=4), _kv_array(), r"must be float32 \[2, 2, 2, 4, 16\]"),
            (_kv(step=5), _kv_array(heads=4), r"\[2, 2, 2, 3, 16\]"),
            (_kv(step=6), _kv_array(dim=8), r"\[2, 2, 2, 3, 16\]"),
            (_kv(step=7, blocks=(2,)), _kv_array(), r"\[1, 2, 2, 3, 16\]"),
            (_kv(step=8, blocks=(1,)), _kv_array(1), r"names blocks \[1\]; this node holds \[2, 4\)"),
            (_kv(step=9, blocks=(3, 3)), _kv_array(), "each block may come once"),
            (_kv(step=10, pos=0), _kv_array(tokens=0), r"positions 0\.\.-1: it needs at least one token"),
            (_kv(step=11, blocks=(2,), pos=300), _kv_array(blocks=1, tokens=300), "256-token context"),
        ]
        for header, array, match in cases:
            await _refuse(pair, "b", header, array, match)
        assert pair.host_b.export_kv("k1") is None and pair.host_b.requests() == 0
        assert pair.sent_by_b == []  # no acknowledgement for a refused frame

        genuine = _kv_array()
        await pair.b.on_frame(sealed(_kv(step=1), genuine, "b", to="b"))
        assert pair.b.counters["kv_blocks_received"] == 2
        exported = pair.host_b.export_kv("k1")
        assert exported is not None
        np.testing.assert_array_equal(exported[3][1].numpy(), genuine[1, 1])
        [(destination, ack)] = pair.sent_by_b
        assert destination == "a" and isinstance(ack.header, KvAckHeader) and not ack.header.failed

    asyncio.run(asyncio.wait_for(main(), 60))


def test_frames_without_values_must_be_empty_and_handoffs_fit_the_context(
    make_pair: Callable[[], Pair], source: Checkpoint
) -> None:
    async def main() -> None:
        pair = make_pair()
        release = ReleaseHeader(request_id="r", step=0, epoch=1, seq=0, target=2)  # type: ignore[arg-type]
        await _refuse(pair, "b", release, _row(4), r"a release frame carries no values, got float32\[4, 64\]")
        ack = KvAckHeader(request_id="r", step=1, epoch=1, seq=0, pass_id=1)  # type: ignore[arg-type]
        await _refuse(pair, "a", ack, _row(1), "a kv_ack frame carries no values")
        handoff = HandoffHeader(request_id="r", step=2, epoch=1, seq=0, target=2, pos=3, new_epoch=2,  # type: ignore[arg-type]
                                pass_id=1, ack_base=9)  # fmt: skip
        await _refuse(pair, "b", handoff, _row(1), "a handoff frame carries no values")
        await _refuse(pair, "b", handoff.model_copy(update={"step": 3, "pos": 257}),
                      np.zeros((0, 64), np.float32), "moves 257 tokens of K/V, over the model's 256")  # fmt: skip
        await _pass_equals_reference(pair, source)

    asyncio.run(asyncio.wait_for(main(), 60))
