"""The egress shaper's delivery-rate estimate (services/worker/shaper.py): frames that
queued behind others measure the link's rate; a link that never queued reports nothing."""

from __future__ import annotations

import asyncio

from services.worker.shaper import EgressShaper, LinkShape
from shared.messages import LinkObservation


def test_a_backlogged_link_reports_its_delivery_rate_and_an_idle_one_nothing() -> None:
    async def main() -> dict[str, float]:
        sent: list[tuple[str, int]] = []
        all_sent = asyncio.Event()

        async def publish(destination: str, frame: bytes) -> None:
            sent.append((destination, len(frame)))
            if len(sent) == 21:
                all_sent.set()

        shaper = EgressShaper(publish)
        shaper.schedule.set_shape("slow", LinkShape(bandwidth_bytes_per_s=200e3, latency_s=0.01))
        shaper.schedule.set_shape("idle", LinkShape(bandwidth_bytes_per_s=200e3))
        runner = asyncio.create_task(shaper.run())
        await asyncio.sleep(0)
        for _ in range(20):  # 20 x 2 kB at once: 0.2 s of link time, all but the first queued
            await shaper.send("slow", bytes(2000))
        await shaper.send("idle", bytes(100))
        async with asyncio.timeout(5):
            await all_sent.wait()
        rates = shaper.delivery_rates()
        assert shaper.delivery_rates() == {}  # each window starts afresh
        runner.cancel()
        return rates

    rates = asyncio.run(main())
    assert set(rates) == {"slow"}
    # absolute release times: a late wake-up shortens the next gap, so the sum stays true
    assert abs(rates["slow"] - 200e3) / 200e3 < 0.25


def test_the_monitor_takes_the_delivery_rate_before_the_probe_pair() -> None:
    """A saturated link's probes read stale (their echoes queue): the traffic's own
    delivery rate is what the profile shows."""
    from services.monitor.detect import MonitorConfig
    from services.monitor.logic import MonitorState
    from shared.messages import BlockTimes, NodeStatus, Telemetry

    def sample(node: str, links: tuple[LinkObservation, ...] = ()) -> Telemetry:
        return Telemetry(node=node, window_s=1.0, cpu_utilisation=0.1, memory_used_bytes=10**8,  # type: ignore[arg-type]
                         requests_in_flight=0, links=links,
                         block_times=BlockTimes(decode_s_per_block=0.002, prefill_s_per_block_token=0.001))  # fmt: skip

    state = MonitorState(MonitorConfig(), links=[("a", "b")])
    for node in ("a", "b"):
        state.on_status(NodeStatus(node=node, state="online", trust=1, memory_bytes=10**9, threads=1), 0.0)  # type: ignore[arg-type]
    for t in range(1, 8):
        both = LinkObservation(peer="b", bandwidth_bytes_per_s=1e6, rtt_s=0.01, probes_sent=2,  # type: ignore[arg-type]
                               delivery_bandwidth_bytes_per_s=8e3)
        state.on_telemetry(sample("a", (both,)), float(t))
        state.on_telemetry(sample("b"), float(t))
    (link,) = (x for x in state.profile(8.0).links if (x.src, x.dst) == ("a", "b"))
    assert link.bandwidth_bytes_per_s == 8e3
