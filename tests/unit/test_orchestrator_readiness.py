"""The first plan waits for a settled live profile: every expected node alive and
measured, every link between them measured, links for at most initial_wait_s."""

from __future__ import annotations

from services.orchestrator.readiness import first_plan_wait
from shared.messages import CapacityProfile, LinkCapacity, NodeCapacity

NODES = ("car", "rsu", "mec")


def profile(speeds: dict[str, float], bandwidths: dict[tuple[str, str], float],
            down: tuple[str, ...] = ()) -> CapacityProfile:  # fmt: skip
    nodes = tuple(NodeCapacity(node=n, alive=n not in down, trust=1, memory_free_bytes=10**9,  # type: ignore[arg-type]
                               flops_per_s=speed, utilisation=0.0) for n, speed in speeds.items())  # fmt: skip
    links = tuple(LinkCapacity(src=s, dst=d, bandwidth_bytes_per_s=b, latency_s=0.001)  # type: ignore[arg-type]
                  for (s, d), b in bandwidths.items())  # fmt: skip
    return CapacityProfile(as_of_s=100.0, nodes=nodes, links=links)


ALL_LINKS = {(s, d): 1e6 for s in NODES for d in NODES if s != d}


def test_waits_for_every_expected_node_alive_and_measured() -> None:
    unmeasured = profile({"car": 1e9, "rsu": 0.0, "mec": 1e9}, ALL_LINKS)
    assert first_plan_wait(unmeasured, NODES, None, 0.0, 30.0) == "waiting for nodes: rsu not measured"
    down = profile({"car": 1e9, "rsu": 1e9, "mec": 1e9}, ALL_LINKS, down=("mec",))
    assert first_plan_wait(down, NODES, None, 0.0, 30.0) == "waiting for nodes: mec not alive"
    missing = profile({"car": 1e9, "rsu": 1e9}, ALL_LINKS)
    assert "mec not alive" in (first_plan_wait(missing, NODES, None, 0.0, 30.0) or "")


def test_waits_for_links_between_expected_nodes_until_the_bound() -> None:
    links = {**ALL_LINKS, ("car", "rsu"): 0.0, ("car", "other"): 0.0}
    unprobed = profile({"car": 1e9, "rsu": 1e9, "mec": 1e9}, links)
    waiting = first_plan_wait(unprobed, NODES, 10.0, 20.0, 30.0)
    assert waiting == "waiting for link measurements: car->rsu"  # car->other: not an expected node
    assert first_plan_wait(unprobed, NODES, 10.0, 40.0, 30.0) is None  # bounded: plans on what it has


def test_ready_when_every_node_and_link_is_measured() -> None:
    settled = profile({"car": 1e9, "rsu": 1e9, "mec": 1e9}, ALL_LINKS)
    assert first_plan_wait(settled, NODES, 10.0, 10.0, 30.0) is None
