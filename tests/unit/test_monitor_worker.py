"""The worker's measuring side without a broker: block timer, probes, passive estimate, emulation."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from pathlib import Path

import pytest

from services.worker.compute import Slowdown
from services.worker.emulation import Emulation, initial_command
from services.worker.probes import LinkProber, passive_bandwidth
from services.worker.settings import WorkerSettings
from services.worker.shaper import EgressSchedule, LinkShape
from services.worker.telemetry import BlockTimer
from shared.messages import EmulatedLink, EmulationCommand
from shared.tensor_frame import Frame, decode_frame


def test_block_timer_keeps_prefill_and_decode_apart_and_benchmark_seeds_them() -> None:
    timer = BlockTimer()
    assert timer.window() is None
    timer.calibrate(0.002, 0.0005)
    assert timer.window().source == "benchmark"  # type: ignore[union-attr]
    timer.record(tokens=1, blocks=2, seconds=0.008)  # 4 ms per block: decode
    timer.record(tokens=10, blocks=2, seconds=0.02)  # 1 ms per block-token: prefill
    times = timer.window()
    assert times is not None and times.source == "forwards"
    assert times.decode_s_per_block == 0.004 and times.prefill_s_per_block_token == 0.001
    assert (times.decode_samples, times.prefill_samples) == (1, 1)
    quiet = timer.window()  # no forwards: the values stay
    assert quiet is not None and quiet.decode_samples == 0 and quiet.decode_s_per_block == 0.004


def test_block_timer_reports_the_median_of_a_window() -> None:
    """A few slow forwards (a page fault, a cold cache) do not move it; a mean would."""
    timer = BlockTimer()
    for seconds in [0.001] * 9 + [0.009] * 3:  # 3 of 12 inflated 9x: the mean is 3 ms
        timer.record(tokens=1, blocks=1, seconds=seconds)
    times = timer.window()
    assert times is not None and times.decode_s_per_block == 0.001 and times.decode_samples == 12


def test_a_batched_decode_is_not_a_prefill_and_measures_the_batch_scaling_against_lone_steps() -> None:
    """8 requests' decode steps as one forward (tokens 1 each, batch 8) taking 3.5 x a lone
    step of the same window: the scaling is (3.5 - 1) / 7, the single-step value stays,
    the prefill value is untouched; a stall among the batches is clipped and outvoted."""
    timer = BlockTimer()
    timer.record(tokens=1, blocks=2, seconds=0.004)  # 2 ms per block alone
    timer.record(tokens=1, blocks=2, seconds=0.014, batch=8)  # 7 ms per block for 8 requests
    timer.record(tokens=1, blocks=2, seconds=0.5, batch=2)  # a stall
    timer.record(tokens=1, blocks=2, seconds=0.014, batch=8)
    times = timer.window()
    assert times is not None and times.decode_samples == 1 and times.batched_samples == 3
    assert times.decode_batch_scaling == pytest.approx(2.5 / 7)
    assert times.decode_s_per_block == pytest.approx(0.002)
    assert times.prefill_s_per_block_token is None  # the batches were not taken for a prefill


def test_a_node_slowed_while_every_step_is_batched_shows_it_in_its_decode_time() -> None:
    """On a busy node every step is batched: a 4 x slowdown must raise the decode time (it
    did not, while only lone steps counted) and must not pass for worse batch scaling."""
    timer = BlockTimer()
    timer.calibrate(0.002, 0.0005, batch_scaling=2.5 / 7)  # the start-up benchmark's numbers
    for _ in range(5):
        timer.record(tokens=1, blocks=1, seconds=0.007, batch=8)
    steady = timer.window()
    assert steady is not None and steady.decode_samples == 0 and steady.batched_samples == 5
    assert steady.decode_s_per_block == pytest.approx(0.002)
    for _ in range(5):
        timer.record(tokens=1, blocks=1, seconds=0.028, batch=8)  # 4 x slower
    slowed = timer.window()
    assert slowed is not None and slowed.decode_s_per_block == pytest.approx(0.008)
    assert slowed.decode_batch_scaling == pytest.approx(2.5 / 7)
    timer.record(tokens=1, blocks=1, seconds=0.030, batch=6)  # ragged batch sizes scale alike
    assert timer.window().decode_s_per_block == pytest.approx(0.030 / (1 + 2.5 / 7 * 5))  # type: ignore[union-attr]


def test_without_a_benchmark_the_first_batches_scale_against_the_last_single_step() -> None:
    timer = BlockTimer()
    timer.record(tokens=8, blocks=2, seconds=0.016, batch=8)  # nothing to scale by yet: dropped
    first = timer.window()
    assert first is None
    timer.record(tokens=1, blocks=2, seconds=0.004)
    assert timer.window().decode_batch_scaling is None  # type: ignore[union-attr]
    timer.record(tokens=1, blocks=2, seconds=0.014, batch=8)  # against the last 2 ms: bootstrap
    times = timer.window()
    assert times is not None and times.decode_batch_scaling == pytest.approx(2.5 / 7)
    assert times.decode_s_per_block == pytest.approx(0.002)


def test_passive_estimate_cancels_the_clock_offset() -> None:
    offset_s, latency_s, bandwidth = 123.4, 0.01, 2e6
    samples = deque((float(i), size, offset_s + latency_s + size / bandwidth)
                    for i, size in enumerate([256, 256, 256, 30_000, 256, 60_000, 30_000]))  # fmt: skip
    estimate, count = passive_bandwidth(samples, since_s=0.0)
    assert count == 7 and abs(estimate - bandwidth) / bandwidth < 0.01  # type: ignore[operator]
    assert passive_bandwidth(deque(list(samples)[:3]), 0.0) == (None, 3)


def test_emulation_commands_and_the_start_state_share_one_path() -> None:
    settings = WorkerSettings(node_id="a", shards_dir=Path("/nonexistent"), slowdown=2.0,
                              link_shapes={"b": (1e6, 0.01)})  # fmt: skip
    slowdown, schedule = Slowdown(), EgressSchedule()
    emulation = Emulation("a", slowdown, schedule, random.Random(1))
    state = emulation.apply(initial_command(settings))
    assert slowdown.factor == 2.0 and schedule.shape("b") == LinkShape(1e6, 0.01)
    assert state.links == (EmulatedLink(dst="b", bandwidth_bytes_per_s=1e6, latency_s=0.01),)  # type: ignore[arg-type]
    state = emulation.apply(EmulationCommand(command_id=5, slowdown=4.0, noise=0.1,
                                             links=(EmulatedLink(dst="c", latency_s=0.05),)))  # type: ignore[arg-type]  # fmt: skip
    assert state.command_id == 5 and slowdown.factor == 4.0 and [l.dst for l in state.links] == ["b", "c"]  # noqa: E741
    emulation.redraw()
    assert 0.9e6 <= schedule.shape("b").bandwidth_bytes_per_s <= 1.1e6  # type: ignore[operator]
    assert 3.6 <= slowdown.factor <= 4.4
    emulation.apply(EmulationCommand(command_id=6, reset_links=True, noise=0.0))
    assert schedule.shape("b") == LinkShape() and slowdown.factor == 4.0


@pytest.mark.parametrize("bandwidth", [1e6, 8e3])
def test_probe_pair_gives_rtt_and_bandwidth_and_the_budget_holds(bandwidth: float) -> None:
    """A fake link with 10 ms latency each way, on a fake clock. At 8 kB/s one round takes
    longer than the whole probe burst (0.1 link-seconds): it must still be measured, within
    the budget (a round waits for a full credit and pays back what it occupied)."""

    async def main() -> None:
        settings = WorkerSettings(node_id="a", shards_dir=Path("/x"), probe_peers=("b",))
        clock = [0.0]
        sent: list[tuple[str, bytes]] = []

        async def send(destination: str, payload: bytes) -> None:
            sent.append((destination, payload))

        prober = LinkProber("a", settings, send, clock=lambda: clock[0], rng=random.Random(0))
        prober.set_online("b", True)
        probe_bytes = 0
        for _ in range(30):  # 30 rounds as the link delivers them
            clock[0] = max(clock[0], prober.next_round_s("b", clock[0]))
            await prober.start_round("b", clock[0])
            pair, sent[:] = list(sent), []
            if not pair:
                clock[0] += 0.25
                continue
            busy_until = clock[0]
            small_s = len(pair[0][1]) / bandwidth  # the small probe's own serialisation
            for _, payload in pair:  # serialised at the link's rate, 10 ms out and 10 ms back
                probe_bytes += len(payload)
                busy_until += len(payload) / bandwidth
                header, array = decode_frame(payload)
                echo = header.model_copy(update={"role": "echo", "src": "b"})
                clock[0] = busy_until + 0.02
                await prober.on_frame(Frame(echo, array[:0]), clock[0], 0.0)
        (observation,) = prober.window()
        assert abs(observation.rtt_s - 0.02 - small_s) < 0.001  # type: ignore[operator]
        assert abs(observation.bandwidth_bytes_per_s - bandwidth) / bandwidth < 0.05  # type: ignore[operator]
        assert probe_bytes / clock[0] / bandwidth < settings.probe_budget_fraction * 1.5

    asyncio.run(main())


def test_forward_compute_time_leaves_out_waiting_and_adds_the_emulated_slowdown() -> None:
    """With single-threaded torch (the worker's default) a forward is timed on the compute
    thread's CPU clock: time spent off the CPU (here a sleep, as waiting for a core or the
    GIL would be) is not compute; the slowdown's extra is (factor - 1) x the compute."""
    from services.worker.compute import ComputeThread, compute_clock

    def timed() -> tuple[float, float]:
        clock = compute_clock()
        began_wall, began = time.perf_counter(), clock()
        time.sleep(0.05)  # off the CPU
        while clock() - began < 0.01:  # 10 ms of compute
            pass
        return clock() - began, time.perf_counter() - began_wall

    async def main() -> tuple[float, float]:
        compute = ComputeThread(threads=1)
        try:
            return await compute.run(timed)
        finally:
            compute.close()

    compute_s, wall_s = asyncio.run(main())
    assert wall_s >= 0.06 and 0.01 <= compute_s < 0.03
    slowdown = Slowdown(4.0)
    began = time.perf_counter()
    assert slowdown.apply(0.01) == pytest.approx(0.03)
    assert time.perf_counter() - began >= 0.03
    assert Slowdown(1.0).apply(0.01) == 0.0


def test_a_late_echo_pair_still_measures_a_saturated_link() -> None:
    """On a slow link full of activations the echoes wait behind them: past the timeout
    the probes count as lost, but the pair's dispersion, when it comes, still measures the
    link (the link must not vanish from the profile for want of samples)."""

    async def main() -> None:
        settings = WorkerSettings(node_id="a", shards_dir=Path("/x"), probe_peers=("b",))
        clock = [0.0]
        sent: list[tuple[str, bytes]] = []

        async def send(destination: str, payload: bytes) -> None:
            sent.append((destination, payload))

        prober = LinkProber("a", settings, send, clock=lambda: clock[0], rng=random.Random(0))
        prober.set_online("b", True)
        bandwidth, queued_s = 10e3, 2 * settings.probe_timeout_s  # echoes queue this long
        for _ in range(200):
            clock[0] = max(clock[0], prober.next_round_s("b", clock[0]))
            await prober.start_round("b", clock[0])
            pair, sent[:] = list(sent), []
            if not pair:
                clock[0] += 0.25
                continue
            started, busy_until = clock[0], clock[0] + queued_s
            for _, payload in pair:
                busy_until += len(payload) / bandwidth
                header, array = decode_frame(payload)
                echo = header.model_copy(update={"role": "echo", "src": "b"})
                clock[0] = busy_until
                prober._expire(prober._peers["b"], started + settings.probe_timeout_s + 0.1)  # noqa: SLF001
                await prober.on_frame(Frame(echo, array[:0]), clock[0], 0.0)
        (observation,) = prober.window()
        assert observation.probes_lost > 0
        assert observation.bandwidth_bytes_per_s is not None
        assert abs(observation.bandwidth_bytes_per_s - bandwidth) / bandwidth < 0.05

    asyncio.run(main())


class FakeLink:
    """A prober's probes over a fake link a -> b on a fake clock: each round's frames are
    serialised at the link's rate, echoed after ``latency_s``, and fed back."""

    def __init__(self, settings: WorkerSettings | None = None) -> None:
        self.settings = settings or WorkerSettings(node_id="a", shards_dir=Path("/x"), probe_peers=("b",))
        self.clock = [0.0]
        self.sent: list[tuple[str, bytes]] = []
        self.sizes: list[int] = []
        """Payload bytes of every probe sent, in order."""

        async def send(destination: str, payload: bytes) -> None:
            self.sent.append((destination, payload))

        self.prober = LinkProber("a", self.settings, send, clock=lambda: self.clock[0], rng=random.Random(0))
        self.prober.set_online("b", True)

    async def round_at(self, bandwidth: float, latency_s: float = 0.002) -> bool:
        """The next due round over a link of ``bandwidth``; False when none went out."""
        clock = self.clock
        clock[0] = max(clock[0], self.prober.next_round_s("b", clock[0]))
        await self.prober.start_round("b", clock[0])
        pair, self.sent[:] = list(self.sent), []
        if not pair:
            clock[0] += 0.05
            return False
        busy_until = clock[0]
        for _, payload in pair:
            self.sizes.append(len(payload))
            busy_until += len(payload) / bandwidth
            header, array = decode_frame(payload)
            clock[0] = busy_until + latency_s
            await self.prober.on_frame(Frame(header.model_copy(update={"role": "echo", "src": "b"}),
                                             array[:0]), clock[0], 0.0)  # fmt: skip
        return True


def test_a_link_that_rose_is_re_probed_at_once_until_resolved() -> None:
    """An estimate of 8 kB/s sizes a 512 B probe; once the link is at 12.5 MB/s that
    probe's dispersion is below the clock's resolution, so it only says "faster". The
    prober then probes again at once with the size the new estimate gives, and knows the
    link within a fraction of a second instead of after several probe periods."""

    async def main() -> None:
        link = FakeLink()
        for _ in range(400):
            await link.round_at(8e3)
        peer = link.prober._peers["b"]  # noqa: SLF001
        assert peer.bandwidth is not None and abs(peer.bandwidth - 8e3) / 8e3 < 0.1
        while not await link.round_at(12.5e6):
            pass
        started = link.clock[0]
        rounds = 1
        while peer.bandwidth < 0.8 * 12.5e6 and rounds < 20:
            rounds += await link.round_at(12.5e6)
        assert peer.bandwidth >= 0.8 * 12.5e6
        assert link.clock[0] - started < 0.5 * link.settings.probe_period_s, (rounds, link.clock[0] - started)

    asyncio.run(main())


def test_a_link_that_fell_is_known_from_two_scouts_without_clogging_it() -> None:
    """At 12.5 MB/s the sized probe is 128 kB; after a fall to 50 kB/s a probe that size
    would hold the link for 2.6 s with every activation behind it. Rounds start with a 2 kB
    scout instead: on the slow link it is resolved, measures the fall, a second round
    confirms it at once, and the prober flags the window as news (sent early)."""

    async def main() -> None:
        link = FakeLink()
        for _ in range(30):
            await link.round_at(12.5e6)
        prober, peer = link.prober, link.prober._peers["b"]  # noqa: SLF001
        assert max(link.sizes) > 100_000  # fast links are measured with sized probes
        (before,) = prober.window()
        assert before.bandwidth_bytes_per_s is not None and before.bandwidth_bytes_per_s > 5e6
        assert not prober.news.is_set()
        link.sizes.clear()
        link.clock[0] += link.settings.probe_period_s  # the link falls a while after the last round
        while not await link.round_at(50e3, latency_s=0.05):
            pass
        fell_at = link.clock[0]
        while not prober.news.is_set() and link.clock[0] - fell_at < 5.0:
            await link.round_at(50e3, latency_s=0.05)
        assert prober.news.is_set()
        assert link.clock[0] - fell_at < 0.5, link.clock[0] - fell_at  # confirmed at once
        assert max(link.sizes) < 4096, link.sizes  # no probe sized for the old link
        (after,) = prober.window()
        assert after.bandwidth_samples >= 2 and after.bandwidth_high_bytes_per_s is not None
        assert abs(after.bandwidth_bytes_per_s - 50e3) / 50e3 < 0.1  # type: ignore[operator]
        assert after.bandwidth_high_bytes_per_s < 0.5 * before.bandwidth_bytes_per_s
        assert after.rtt_samples >= 2 and after.rtt_low_s is not None and after.rtt_low_s > 0.05  # the fake round trip: latency + serialisation
        assert peer.bandwidth is not None

    asyncio.run(main())


@pytest.mark.parametrize("fallen_to", [300e3, 150e3])
def test_a_fall_the_scout_resolves_below_the_dispersion_is_confirmed_without_an_old_sized_probe(
    fallen_to: float,
) -> None:
    """At 300 kB/s the 2 kB scout takes 6.8 ms: shorter than the 20 ms a sized probe
    targets, but resolved and 37x what the 11 MB/s estimate predicts. The pair it calls is
    sized from the scout for 60 ms (CONFIRM_S), not from the old estimate (128 kB: 0.44 s
    of the link at 300 kB/s, seconds once it falls on; and charged that, the link's probe
    credit kept it unprobed for 10 s: the V2X handover's late first re-plan, 2026-12-07)."""

    async def main() -> None:
        link = FakeLink()
        for _ in range(30):
            await link.round_at(12.5e6)
        prober = link.prober
        prober.window()
        link.sizes.clear()
        link.clock[0] += link.settings.probe_period_s
        while not await link.round_at(fallen_to, latency_s=0.01):
            pass
        fell_at = link.clock[0]
        while not prober.news.is_set() and link.clock[0] - fell_at < 5.0:
            await link.round_at(fallen_to, latency_s=0.01)
        assert prober.news.is_set()
        assert link.clock[0] - fell_at < 0.5, link.clock[0] - fell_at
        assert max(link.sizes) < 24_000, link.sizes  # no probe sized for the old link (128 kB)
        (after,) = prober.window()
        assert after.bandwidth_bytes_per_s is not None
        assert abs(after.bandwidth_bytes_per_s - fallen_to) / fallen_to < 0.1, after

    asyncio.run(main())


def test_a_stalled_scout_on_a_fast_link_is_refuted_not_news() -> None:
    """A 10 ms event-loop stall in a scout's echo looks like 200 kB/s on a 12.5 MB/s link:
    the pair it calls, sized from the scout, is under-resolved there (an "at least" reading,
    never a fall), so nothing is news and the link is measured fast again. A 5 ms stall on
    that pair too (a loaded CI machine) is still no fall: it is short of the 30 ms margin a
    first fall needs."""

    async def main() -> None:
        link = FakeLink()
        for _ in range(30):
            await link.round_at(12.5e6)
        prober, peer = link.prober, link.prober._peers["b"]  # noqa: SLF001
        prober.window()
        for _ in range(200):  # until a round is a scout
            link.clock[0] = max(link.clock[0], prober.next_round_s("b", link.clock[0]))
            await prober.start_round("b", link.clock[0])
            if len(link.sent[-1][1]) < 4096:
                break
            link.sent.clear()
            link.clock[0] += 0.01
        async def echo_with_stall(stall_s: float) -> None:
            pair, link.sent[:] = list(link.sent), []
            for index, (_, payload) in enumerate(pair):
                header, array = decode_frame(payload)
                link.clock[0] += len(payload) / 12.5e6 + 0.002 + (stall_s if index else 0.0)
                await prober.on_frame(Frame(header.model_copy(update={"role": "echo", "src": "b"}),
                                            array[:0]), link.clock[0], 0.0)  # fmt: skip

        await echo_with_stall(0.010)
        assert peer.scout_fell
        await prober.start_round("b", link.clock[0])  # the pair the scout called, at once
        await echo_with_stall(0.005)
        assert peer.fallen == 0 and not peer.scout_fell
        for _ in range(6):
            await link.round_at(12.5e6)
        assert not prober.news.is_set()
        (after,) = prober.window()
        assert after.bandwidth_bytes_per_s is not None and after.bandwidth_bytes_per_s > 5e6, after

    asyncio.run(main())


def test_an_emulation_command_not_above_the_last_applied_is_refused_as_a_replay() -> None:
    """Replay fencing (docs/SECURITY.md): a genuine command sent again, or an older one,
    changes nothing and is counted ``EmulationCommand_replayed``."""
    from collections import Counter

    from shared.security.signing import ControlGate

    emulation = Emulation("car", Slowdown(1.0), EgressSchedule())
    emulation.gate = ControlGate("00" * 32, "car", Counter())
    first = EmulationCommand(command_id=3, slowdown=4.0)
    assert emulation.fresh(first)
    emulation.apply(first)
    assert not emulation.fresh(first)  # the same command again
    assert not emulation.fresh(EmulationCommand(command_id=2, slowdown=50.0))  # an older one
    assert emulation.fresh(EmulationCommand(command_id=4, slowdown=1.0))
    assert emulation.gate.refusals() == {"EmulationCommand_replayed": 2}
    assert emulation.state().slowdown == 4.0


def test_one_noisy_window_does_not_move_the_batch_scaling() -> None:
    """The scaling reported is the median of the last windows' estimates: one window whose
    few lone steps happened to be fast (a scaling of 2 here) does not make the node look
    unable to batch, and so cannot swing a plan on its own."""
    timer = BlockTimer()
    for seconds in (0.007, 0.007, 0.018):  # per block, 8 requests, against 2 ms alone
        timer.record(tokens=1, blocks=1, seconds=0.002)
        timer.record(tokens=1, blocks=1, seconds=seconds, batch=8)
        times = timer.window()
    assert times is not None and times.decode_batch_scaling == pytest.approx(2.5 / 7)
