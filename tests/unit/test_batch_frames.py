"""Batch frames (services/worker/batch_frames.py, shared/frame_headers.py `BatchHeader`).

Encoding and splitting round trip (fp32 and int8 rows); chunking by rows, bytes and
repeated requests; the sender's queue (steps of one turn share a frame, a lone step is
today's frame byte for byte, ``enabled`` False sends one frame per step); and, through
the two real data planes of tests/unit/test_frame_checks.py (a: entry, blocks [0, 2);
b: blocks [2, 4) of a tiny llama), concurrent decode steps crossing each hop as one
frame with results equal to the unsplit model, a request without KV failing alone
inside a batch, and hostile batch frames (bad MAC, changed rows, wrong sender,
malformed layouts) dropped and counted without compute.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections import Counter
from collections.abc import Callable
from itertools import count

import msgpack
import numpy as np
import pytest

from services.worker.batch_frames import OutboundBatches, _Row, batch_of, chunked, split_batch
from services.worker.compute import SegmentHost, Slowdown
from services.worker.errors import FrameRefused
from shared.errors import TensorFrameError
from shared.frame_headers import (
    MAX_BATCH_ROWS,
    ActivationHeader,
    BatchHeader,
    BatchRow,
    FrameHeader,
    ResultHeader,
)
from shared.ids import NodeId
from shared.tensor_frame import (
    ALIGN_BYTES,
    Frame,
    compress_activation,
    decode_frame,
    decompress_activation,
    encode_frame,
)
from tests.unit.test_frame_checks import (  # noqa: F401 - make_pair and source are fixtures
    KEY,
    NAN,
    Pair,
    _Entry,
    make_pair,
    sealed,
    source,
)

OTHER_KEY = bytes(range(1, 33))
PROMPTS = {"r1": [5, 9, 17, 33], "r2": [7, 3], "r3": [11, 12, 13, 14, 15, 16]}


def _step(request_id: str, pos: int, step: int = 1, target: int = 2) -> ActivationHeader:
    return ActivationHeader(request_id=request_id, step=step, epoch=1, seq=0, target=target, pos=pos,  # type: ignore[arg-type]
                            last_only=True, pass_id=40 + pos, src=NodeId("a"), sent_at=1.7e9)  # fmt: skip


def _rows(requests: int, width: int = 64) -> np.ndarray:
    return np.random.default_rng(requests).standard_normal((requests, width)).astype(np.float32)


async def _rows_of(headers: list[ActivationHeader], array: np.ndarray, target: int = 2) -> list[_Row]:
    return [_Row(header, array[i : i + 1], target) for i, header in enumerate(headers)]


def test_a_batch_frame_round_trips_into_the_rows_it_carries() -> None:
    async def main() -> None:
        headers = [_step("r1", 4), _step("r2", 9, step=3), _step("r3", 6)]
        for precision in ("fp32", "int8"):
            values = _rows(3)
            array = compress_activation(values, precision)
            header, stacked = batch_of(await _rows_of(headers, array), seq=17)
            assert header.kind == "batch" and header.of == "activation" and header.target == 2
            assert (header.request_id, header.step, header.seq, header.src) == ("r1", 1, 17, "a")
            decoded, body = decode_frame(encode_frame(header, stacked, KEY))
            assert isinstance(decoded, BatchHeader) and decoded.rows == header.rows and len(decoded.mac) == 32
            rows = split_batch(decoded, body)
            for row, sent in zip(rows, headers, strict=True):
                assert isinstance(row.header, ActivationHeader)
                assert row.header.model_dump(exclude={"seq", "sent_at", "mac"}) == sent.model_dump(
                    exclude={"seq", "sent_at", "mac"})  # fmt: skip
                assert (row.header.seq, row.header.sent_at) == (17, decoded.sent_at)
            restored = np.concatenate([decompress_activation(row.array, 64) for row in rows])
            tolerance = 0 if precision == "fp32" else 0.02
            np.testing.assert_allclose(restored, values, atol=tolerance * float(np.abs(values).max()))

    asyncio.run(main())


def test_result_rows_split_into_results() -> None:
    async def main() -> None:
        results = [ResultHeader(request_id=r, step=2, epoch=1, seq=0, pass_id=p, src="b", sent_at=1.0)  # type: ignore[arg-type]
                   for r, p in (("r1", 5), ("r2", 6))]  # fmt: skip
        rows = [_Row(h, _rows(2)[i : i + 1], 4) for i, h in enumerate(results)]
        header, stacked = batch_of(rows, seq=1)
        assert header.of == "result" and header.target == 4
        split = split_batch(*decode_frame(encode_frame(header, stacked, KEY)))  # type: ignore[arg-type]
        assert [(f.header.request_id, f.header.pass_id, f.header.kind) for f in split] == [  # type: ignore[union-attr]
            ("r1", 5, "result"), ("r2", 6, "result")]  # fmt: skip

    asyncio.run(main())


def test_chunks_keep_row_and_byte_limits_and_each_request_once() -> None:
    async def main() -> None:
        many = [_Row(_step(f"q{i}", 3), np.zeros((1, 8), np.float32), 2) for i in range(MAX_BATCH_ROWS + 3)]
        assert [len(c) for c in chunked(many)] == [MAX_BATCH_ROWS, 3]
        wide = np.broadcast_to(np.zeros((1, 1), np.float32), (1, 2**20))  # 4 MB a row, not allocated
        big = [_Row(_step(f"w{i}", 3), wide, 2) for i in range(16)]
        assert [len(c) for c in chunked(big)] == [15, 1]  # the broker's 64 MB packet
        again = [_Row(_step(r, p), np.zeros((1, 8), np.float32), 2) for r, p in (("x", 3), ("y", 3), ("x", 4))]
        assert [[row.header.request_id for row in c] for c in chunked(again)] == [["x", "y"], ["x"]]

    asyncio.run(main())


def test_steps_sent_in_one_turn_share_a_frame_and_a_lone_step_is_todays_frame() -> None:
    def key_for(destination: str) -> bytes:  # a pair key: each destination has its own
        return hashlib.sha256(KEY + destination.encode()).digest()

    async def seal(destination: str, header: FrameHeader, array: np.ndarray) -> bytes:
        return encode_frame(header, array, key_for(destination))

    async def main() -> None:
        sent: list[tuple[str, bytes]] = []

        async def send(destination: str, payload: bytes) -> None:
            sent.append((destination, payload))

        counters: Counter[str] = Counter()
        batches = OutboundBatches(seal, send, count(), counters)
        values = _rows(4)
        await asyncio.gather(*(batches.send("b", _step(f"r{i}", 5 + i), values[i : i + 1], 2) for i in range(3)),
                             batches.send("c", _step("r9", 5, target=3), values[3:4], 3))  # fmt: skip
        assert [destination for destination, _ in sent] == ["b", "c"]
        header, array = decode_frame(sent[0][1])
        assert isinstance(header, BatchHeader) and [r.request_id for r in header.rows] == ["r0", "r1", "r2"]
        np.testing.assert_array_equal(array, values[:3])
        assert sent[1][1] == encode_frame(_step("r9", 5, target=3), values[3:4], key_for("c"))  # unchanged wire
        assert (counters["batched_frames_sent"], counters["batched_frames_rows"]) == (1, 3)

        sent.clear()
        batches.enabled = False
        await asyncio.gather(*(batches.send("b", _step(f"r{i}", 5 + i), values[i : i + 1], 2) for i in range(3)))
        assert [decode_frame(p)[0].kind for _, p in sent] == ["activation"] * 3

    asyncio.run(main())


def test_a_send_failure_reaches_every_row_of_its_frame() -> None:
    async def seal(destination: str, header: FrameHeader, array: np.ndarray) -> bytes:
        raise FrameRefused("no frame key for epoch 1")

    async def send(destination: str, payload: bytes) -> None:
        raise AssertionError("nothing is sealed")

    async def main() -> None:
        batches = OutboundBatches(seal, send, count(), Counter())
        outcomes = await asyncio.gather(*(batches.send("b", _step(f"r{i}", 3), _rows(2)[i : i + 1], 2) for i in range(2)),
                                        return_exceptions=True)  # fmt: skip
        assert all(isinstance(o, FrameRefused) for o in outcomes), outcomes

    asyncio.run(main())


def _reference_decode(source: object,  # noqa: F811
                       prompt: list[int], token: int) -> np.ndarray:
    """The unsplit model's final state for ``token`` after ``prompt``."""
    entry, host = _Entry(source), SegmentHost(source, 0, 4)  # type: ignore[arg-type]
    host.forward("ref", entry.embed_tokens(np.array(prompt), 0), 0, Slowdown())
    return host.forward("ref", entry.embed_tokens(np.array([token]), len(prompt)), len(prompt), Slowdown())


def test_concurrent_decode_steps_cross_each_hop_as_one_frame(make_pair: Callable[[], Pair], source: object) -> None:  # noqa: F811
    async def main() -> None:
        pair = make_pair()
        for request_id, prompt in PROMPTS.items():  # prefill: one frame each, as before
            await pair.a.pipeline_pass(request_id, 0, np.array(prompt), 0, last_only=True)
        assert pair.a.counters["batched_frames_sent"] == 0
        steps = [pair.a.pipeline_pass(r, 1, np.array([20 + i]), len(p), last_only=True)
                 for i, (r, p) in enumerate(PROMPTS.items())]  # fmt: skip
        results = await asyncio.gather(*steps)
        for i, ((hidden, epoch), prompt) in enumerate(zip(results, PROMPTS.values(), strict=True)):
            assert epoch == 1
            np.testing.assert_allclose(hidden, _reference_decode(source, prompt, 20 + i), rtol=1e-5, atol=1e-5)
        # a -> b: one frame of three steps; b ran them as one batch; b -> a: one frame of results
        assert (pair.a.counters["batched_frames_sent"], pair.a.counters["batched_frames_rows"]) == (1, 3)
        assert (pair.b.counters["batched_frames_received"], pair.b.counters["batched_frames_received_rows"]) == (1, 3)
        assert (pair.b.counters["decode_batches"], pair.b.counters["decode_batched_rows"]) == (1, 3)
        [(destination, back)] = [sent for sent in pair.sent_by_b if sent[1].header.step == 1]
        assert destination == "a" and isinstance(back.header, BatchHeader) and back.header.of == "result"
        assert pair.a.counters["frames_forged"] == pair.b.counters["frames_forged"] == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_request_failing_inside_a_batch_does_not_fail_the_others(make_pair: Callable[[], Pair]) -> None:  # noqa: F811
    """b lacks the KV of r2 (released): r2's row is answered kv_missing, r1's and r3's
    rows of the same batch frame run and return."""

    async def main() -> None:
        pair = make_pair()
        for request_id, prompt in PROMPTS.items():
            await pair.a.pipeline_pass(request_id, 0, np.array(prompt), 0, last_only=True)
        pair.host_b.release("r2")
        steps = [pair.a.pipeline_pass(r, 1, np.array([20]), len(p), last_only=True) for r, p in PROMPTS.items()]
        outcomes = await asyncio.gather(*steps, return_exceptions=True)
        assert type(outcomes[1]).__name__ == "KvMissing", outcomes
        assert all(isinstance(o, tuple) and o[0].shape == (1, 64) for o in (outcomes[0], outcomes[2])), outcomes
        assert pair.b.counters["kv_missing"] == 1 and pair.b.counters["batched_frames_received"] == 1

    asyncio.run(asyncio.wait_for(main(), 60))


def _batch(rows: tuple[BatchRow, ...], request_id: str | None = None, of: str = "activation",
           target: int = 2) -> BatchHeader:  # fmt: skip
    first = rows[0]
    return BatchHeader(request_id=request_id or first.request_id, step=first.step, epoch=1, seq=0,  # type: ignore[arg-type]
                       of=of, target=target, rows=rows)  # type: ignore[arg-type]  # fmt: skip


def _row(request_id: str, pos: int = 3) -> BatchRow:
    return BatchRow(request_id=request_id, step=1, pass_id=7, pos=pos, last_only=True)  # type: ignore[arg-type]


TWO = (_row("h1"), _row("h2"))


def _edited(frame: bytes, fields: dict[str, object]) -> bytes:
    """``frame`` with its wire header map's ``fields`` replaced (the tensor bytes kept)."""
    prefix = struct.Struct("<4sI")
    magic, length = prefix.unpack_from(frame)
    start = prefix.size + length
    header = msgpack.unpackb(frame[prefix.size : start], raw=False) | fields
    packed = msgpack.packb(header, use_bin_type=True)
    head = prefix.pack(magic, len(packed)) + packed
    return head + b"\0" * (-len(head) % ALIGN_BYTES) + frame[start + (-start % ALIGN_BYTES) :]


def test_forged_batch_frames_are_dropped_without_compute(make_pair: Callable[[], Pair]) -> None:  # noqa: F811
    async def main() -> None:
        pair = make_pair()
        genuine = sealed(_batch(TWO), _rows(2), "a")
        forged = [
            sealed(_batch(TWO), _rows(2), "a", OTHER_KEY),  # a guessed key
            Frame(genuine.header, genuine.array + 1.0),  # values changed after sealing
            Frame(genuine.header.model_copy(update={"rows": (_row("h1"), _row("h3"))}), genuine.array),
            sealed(_batch(TWO), _rows(2), "b"),  # b is on the route, not this hop's sender
            sealed(_batch(TWO), _rows(2), "mallory"),
            Frame(*decode_frame(encode_frame(_batch(TWO), _rows(2)))),  # no MAC
        ]
        for number, frame in enumerate(forged, 1):
            assert await pair.b.open_batch(frame) == []
            assert pair.b.counters["frames_forged"] == number
        # results claimed by the entry itself (the last block's owner is b)
        result_rows = (BatchRow(request_id="h1", step=1, pass_id=7), BatchRow(request_id="h2", step=1, pass_id=8))  # type: ignore[arg-type]
        assert await pair.a.open_batch(sealed(_batch(result_rows, of="result", target=4), _rows(2), "a")) == []
        assert pair.a.counters["frames_forged"] == 1
        assert pair.host_b.requests() == 0 and pair.sent_by_b == []
        with pytest.raises(FrameRefused, match="must be opened first"):
            await pair.b.on_frame(genuine)  # a batch frame is never handled as one request's
        assert len(await pair.b.open_batch(genuine)) == 2

    asyncio.run(asyncio.wait_for(main(), 60))


def test_malformed_batch_frames_are_refused_and_counted(make_pair: Callable[[], Pair]) -> None:  # noqa: F811
    async def main() -> None:
        pair = make_pair()
        nan = _rows(2)
        nan[1, 5] = NAN
        cases: list[tuple[BatchHeader, np.ndarray, str]] = [
            (_batch(TWO), _rows(3), r"batch frame of 2 rows must be \[2, 64\]"),
            (_batch(TWO), _rows(2)[:, :32].copy(), "batch frame of 2 rows"),
            (_batch(TWO), nan, "batch frame holds 1 NaN"),
            (_batch(TWO, request_id="h9"), _rows(2), "its first row is request h1"),
            (_batch((_row("h1"), _row("h1"))), _rows(2), "names a request twice"),
            (_batch((_row("h1"), _row("h2", pos=0))), _rows(2), "at position 0"),
            (_batch((_row("h1"), _row("h2", pos=256))), _rows(2), "256-token context"),
            (_batch((BatchRow(request_id="h1", step=1, pass_id=7, pos=2), BatchRow(request_id="h2", step=1, pass_id=7)),  # type: ignore[arg-type]
                    of="result", target=4), _rows(2), "a row with a position"),  # fmt: skip
        ]
        for number, (header, array, match) in enumerate(cases, 1):
            plane = pair.a if header.of == "result" else pair.b
            with pytest.raises(FrameRefused, match=match):
                await plane.open_batch(sealed(header, array, "b" if header.of == "result" else "a"))
            assert pair.a.counters["batched_frames_refused"] + pair.b.counters["batched_frames_refused"] == number
        assert pair.host_b.requests() == 0
        edits: tuple[dict[str, object], ...] = ({"rows": [TWO[0].model_dump()]}, {"rows": [{"request_id": "h1"}] * 2}, {"of": "kv"})
        for edit in edits:
            with pytest.raises(TensorFrameError, match="bad batch frame header"):
                decode_frame(_edited(encode_frame(_batch(TWO), _rows(2), KEY), edit))

    asyncio.run(asyncio.wait_for(main(), 60))
