"""The gateway's dashboard state (services/gateway/dashboard.py): the view it pushes, its
server-sent events, and the page that ships in the package; up's metrics targets file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from services.cli.metrics_up import assign_metrics_ports, write_targets
from services.gateway.dashboard import DashboardState, dashboard_page, dashboard_view
from shared.messages import (
    CapacityProfile,
    DecisionRecorded,
    LinkCapacity,
    NodeCapacity,
    Plan,
    Segment,
)


def plan(epoch: int, *segments: tuple[str, int, int]) -> Plan:
    return Plan(epoch=epoch, model_id="tiny", entry_node="car",
                segments=tuple(Segment(node=n, start=s, end=e) for n, s, e in segments))  # type: ignore[arg-type]


def profile() -> CapacityProfile:
    def node(name: str, alive: bool = True) -> NodeCapacity:
        return NodeCapacity(node=name, alive=alive, trust=1, memory_free_bytes=1, flops_per_s=1.0,
                            utilisation=0.1, cpu_utilisation=0.3, kv_cache_bytes=10)  # type: ignore[arg-type]

    return CapacityProfile(as_of_s=1.0, nodes=(node("car"), node("rsu"), node("mec", alive=False)),
                           links=(LinkCapacity(src="rsu", dst="car", bandwidth_bytes_per_s=2e6, latency_s=0.002,
                                               health="degraded"),))  # type: ignore[arg-type]  # fmt: skip


def test_the_view_has_nodes_links_plan_bands_decisions_and_tpot() -> None:
    state = DashboardState()
    state.apply(profile())
    state.apply(plan(3, ("car", 0, 2), ("rsu", 2, 6)))
    state.apply(DecisionRecorded(decision_id=4, trigger="link_degraded", action="migrate", predicted_gain_s=1.5,
                                 realised_gain_s=0.7, at_s=10.0, from_epoch=2, to_epoch=3, outcome="committed"))
    state.record_tpot(0.05)
    view = dashboard_view(state)
    assert (view["epoch"], view["entry"], view["num_blocks"], view["model"]) == (3, "car", 6, "tiny")
    nodes = {node["id"]: node for node in view["nodes"]}
    assert nodes["car"]["blocks"] == [0, 2] and nodes["rsu"]["blocks"] == [2, 6] and nodes["mec"]["blocks"] is None
    assert nodes["mec"]["health"] == "down" and nodes["car"]["utilisation"] == 0.3
    assert view["links"] == [{"src": "rsu", "dst": "car", "bandwidth_bytes_per_s": 2e6, "latency_s": 0.002,
                              "health": "degraded"}]  # fmt: skip
    decision = view["decisions"][0]
    assert (decision["trigger"], decision["predicted_gain_s"], decision["realised_gain_s"]) == ("link_degraded", 1.5, 0.7)
    assert len(view["tpot_ms"]) == 1 and view["tpot_ms"][0][1] == 50.0
    json.dumps(view)  # what the events carry


def test_an_older_plan_does_not_replace_a_newer_one_and_decisions_are_bounded() -> None:
    state = DashboardState()
    state.apply(plan(5, ("car", 0, 6)))
    state.apply(plan(4, ("rsu", 0, 6)))
    assert dashboard_view(state)["epoch"] == 5
    for number in range(20):
        state.apply(DecisionRecorded(decision_id=number, trigger="periodic", action="keep"))
    assert [d["id"] for d in dashboard_view(state)["decisions"]] == list(range(19, 11, -1))


def test_events_push_the_view_now_and_after_each_change() -> None:
    async def main() -> list[dict[str, object]]:
        state = DashboardState()
        state.apply(plan(1, ("car", 0, 6)))
        events = state.events()
        first = json.loads((await anext(events)).removeprefix("data: "))
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.3)
        state.apply(plan(2, ("car", 0, 1), ("rsu", 1, 6)))
        second = json.loads((await asyncio.wait_for(pending, 5)).removeprefix("data: "))
        await events.aclose()
        return [first, second]

    first, second = asyncio.run(main())
    assert first["epoch"] == 1 and second["epoch"] == 2
    assert second["segments"] == [{"node": "car", "start": 0, "end": 1}, {"node": "rsu", "start": 1, "end": 6}]


def test_the_page_ships_in_the_package_and_loads_nothing_from_elsewhere() -> None:
    page = dashboard_page()
    assert "EventSource(\"/dashboard/events\"" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_up_gives_each_process_its_own_port_and_records_the_targets(tmp_path: Path) -> None:
    environments: dict[str, dict[str, str]] = {"car": {"EDGESPLIT_PLAN_SIGNING_KEY_FILE": "k"}}
    targets = assign_metrics_ports(["car", "rsu", "monitor"], environments)
    ports = {environment["EDGESPLIT_METRICS_PORT"] for environment in environments.values()}
    assert len(ports) == 3 and environments["car"]["EDGESPLIT_PLAN_SIGNING_KEY_FILE"] == "k"
    written = json.loads(write_targets(tmp_path, targets, "c1").read_text())
    assert {group["labels"]["service"]: group["targets"][0] for group in written} == targets
    assert all(group["labels"]["cluster"] == "c1" for group in written)
