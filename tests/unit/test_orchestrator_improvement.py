"""The ``profile_improved`` trigger's check: a link or node much better than the profile
the last decision saw re-decides; noise, fast links and dead nodes do not."""

from __future__ import annotations

from services.orchestrator.improvement import improvement
from shared.messages import CapacityProfile, LinkCapacity, NodeCapacity


def profile(rsu2_bytes_per_s: float, rsu2_rtt_s: float = 0.08, rsu2_flops: float = 1e9,
            alive: bool = True) -> CapacityProfile:  # fmt: skip
    nodes = tuple(NodeCapacity(node=n, alive=alive if n == "rsu2" else True, trust=1, memory_free_bytes=1 << 30,
                               flops_per_s=rsu2_flops if n == "rsu2" else 1e9, utilisation=0.1)
                  for n in ("car", "rsu1", "rsu2"))  # fmt: skip
    links = (LinkCapacity(src="car", dst="rsu1", bandwidth_bytes_per_s=12.5e6, latency_s=0.001, rtt_s=0.002),
             LinkCapacity(src="car", dst="rsu2", bandwidth_bytes_per_s=rsu2_bytes_per_s,
                          latency_s=rsu2_rtt_s / 2, rtt_s=rsu2_rtt_s))  # fmt: skip
    return CapacityProfile(as_of_s=1.0, nodes=nodes, links=links)


def test_a_link_fading_in_is_an_improvement() -> None:
    detail = improvement(profile(20e3), profile(300e3))
    assert detail is not None and "car->rsu2" in detail and "300 kB/s" in detail
    rtt = improvement(profile(20e3, 0.08), profile(25e3, 0.02))
    assert rtt is not None and "rtt 20.0 ms" in rtt


def test_noise_a_small_rise_and_fast_links_are_not() -> None:
    assert improvement(profile(20e3), profile(22e3)) is None  # +10 %
    assert improvement(profile(20e3), profile(39e3)) is None  # under 2 x
    assert improvement(profile(25e6), profile(90e6)) is None  # already fast: CPU jitter
    assert improvement(profile(20e3, 0.008), profile(20e3, 0.002)) is None  # 4 x, but 6 ms


def test_a_node_that_sped_up_is_and_a_dead_one_is_not() -> None:
    detail = improvement(profile(20e3, rsu2_flops=1e9), profile(20e3, rsu2_flops=4e9))
    assert detail == "node rsu2 4.0 x faster"
    assert improvement(profile(20e3, rsu2_flops=1e9), profile(20e3, rsu2_flops=1.4e9)) is None
    assert improvement(profile(20e3, rsu2_flops=1e9), profile(20e3, rsu2_flops=4e9, alive=False)) is None
