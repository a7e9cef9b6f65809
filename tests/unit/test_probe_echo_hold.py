"""A probe's echo that waits in the peer's egress queue behind traffic (a result frame on
its way back) says how long it waited (``ProbeHeader.held_s``), and the prober takes that
off its arrival: a link carrying traffic measures as fast as an idle one
(services/worker/probes.py, shaper.py)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from services.worker.probes import LinkProber
from services.worker.settings import WorkerSettings
from services.worker.shaper import EgressSchedule, LinkShape
from shared.tensor_frame import Frame, decode_frame

BANDWIDTH, LATENCY_S = 12.5e6, 0.002
RESULT_BYTES = 4 * 92_160  # four MiniLM result frames (60 tokens x 384 x 4 bytes each)


def measure(traffic: str, honour_hold: bool) -> float:
    """Rounds of a's probes to b over a 12.5 MB/s link both ways. ``traffic``: "none";
    "before": b queues result frames to a just before it echoes the small ping (both
    echoes wait, the gap shrinks); "between": just after (only the sized probe's echo
    waits, the gap grows). Returns a's last estimate."""

    async def main() -> float:
        clock = [0.0]
        back = EgressSchedule()  # b -> a
        back.set_shape("a", LinkShape(BANDWIDTH, LATENCY_S))
        to_b: list[bytes] = []
        echoes: list[tuple[float, bytes]] = []

        async def a_sends(destination: str, payload: bytes) -> None:
            to_b.append(payload)

        async def b_sends(destination: str, payload: bytes) -> None:
            echoes.append((back.release_time("a", len(payload), clock[0]), payload))

        def settings(node: str, peer: str) -> WorkerSettings:
            return WorkerSettings(node_id=node, shards_dir=Path("/x"), probe_peers=(peer,))

        a = LinkProber("a", settings("a", "b"), a_sends, clock=lambda: clock[0], rng=random.Random(0))
        b = LinkProber("b", settings("b", "a"), b_sends, clock=lambda: clock[0], rng=random.Random(1),
                       queue_wait=lambda node: back.wait_s(node, clock[0]))  # fmt: skip
        a.set_online("b", True)
        for _ in range(40):
            clock[0] = max(clock[0], a.next_round_s("b", clock[0]))
            await a.start_round("b", clock[0])
            pair, to_b[:] = list(to_b), []
            if not pair:
                clock[0] += 0.05
                continue
            busy_until = clock[0]
            for index, payload in enumerate(pair):  # a -> b: serialised, then the latency
                busy_until += len(payload) / BANDWIDTH
                clock[0] = busy_until + LATENCY_S
                if traffic == "before" and index == 0:
                    back.release_time("a", RESULT_BYTES, clock[0])
                header, array = decode_frame(payload)
                await b.on_frame(Frame(header, array), clock[0], 0.0)
                if traffic == "between" and index == 0:
                    back.release_time("a", RESULT_BYTES, clock[0])
            for arrival_s, echo in sorted(echoes, key=lambda item: item[0]):
                clock[0] = max(clock[0], arrival_s)
                header, array = decode_frame(echo)
                if not honour_hold:
                    header = header.model_copy(update={"held_s": 0.0})
                await a.on_frame(Frame(header, array), arrival_s, 0.0)
            echoes.clear()
        bandwidth = a._peers["b"].bandwidth  # noqa: SLF001
        assert bandwidth is not None
        return bandwidth

    return asyncio.run(main())


def test_an_idle_link_measures_its_rate() -> None:
    assert measure("none", honour_hold=True) == pytest.approx(BANDWIDTH, rel=0.1)


@pytest.mark.parametrize("traffic", ["before", "between"])
def test_a_link_carrying_results_back_measures_its_rate_once_the_echo_says_its_wait(traffic: str) -> None:
    assert measure(traffic, honour_hold=True) == pytest.approx(BANDWIDTH, rel=0.1)


def test_without_the_wait_the_same_link_measures_wrong_both_ways() -> None:
    """What happened before an echo said its wait (and the guard that the tests above
    measure something): result frames queued between the two echoes made the link look
    several times slower (the smart-city run's busy link), queued before both they made
    it look faster."""
    assert measure("between", honour_hold=False) < 0.5 * BANDWIDTH
    assert measure("before", honour_hold=False) > 2 * BANDWIDTH
