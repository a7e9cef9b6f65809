"""Every policy of a scenario starts from one plan: the planner's best for the declared
topology (services/cli/scenarios/first_plan.py), pinned in each orchestrator with
``--first-plan`` (services/orchestrator/settings.py ``parse_layout``, candidates.py
``pinned_first``), and the report names the plan each policy started from."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.scenarios.first_plan import declared_first_plan, format_layout, plan_for
from services.cli.scenarios.records import Placement, PolicyRun
from services.cli.scenarios.report import first_layout
from services.orchestrator.candidates import pinned_first
from services.orchestrator.logic import CandidatePlan
from services.orchestrator.settings import parse_layout
from shared.errors import ConfigError
from shared.messages import Segment
from shared.model.shard import ShardStore
from shared.model.shard_write import write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.topology import Topology

BLOCK_S = 0.002  # decode s per block; prefill s per block-token below


def city(edge1_speed: float = 1.0, edge2_speed: float = 0.6, gateway_memory: float = 1e9,
         edge_trust: int = 1) -> Topology:  # fmt: skip
    return Topology.model_validate({
        "name": "city", "private_blocks": 1, "trusted_level": 2,
        "nodes": [
            {"id": "gateway", "trust": 2, "memory_bytes": gateway_memory, "speed": 0.3, "entry": True},
            {"id": "edge1", "trust": edge_trust, "memory_bytes": 1e9, "speed": edge1_speed},
            {"id": "edge2", "trust": edge_trust, "memory_bytes": 1e9, "speed": edge2_speed},
        ],
        "links": [
            {"src": "gateway", "dst": "edge1", "bandwidth_bytes_per_s": 12.5e6, "latency_s": 0.002},
            {"src": "gateway", "dst": "edge2", "bandwidth_bytes_per_s": 12.5e6, "latency_s": 0.002},
            {"src": "edge1", "dst": "edge2", "bandwidth_bytes_per_s": 125e6, "latency_s": 0.001},
        ],
    })  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ShardStore:
    root = tmp_path_factory.mktemp("first-plan")
    write_shards(write_tiny_checkpoint("llama", root / "model", layers=6, seed=3), root / "shards")
    return ShardStore(root / "shards")


def test_the_declared_plan_puts_the_private_block_on_the_entry_and_the_rest_on_the_fastest_box(
    store: ShardStore,
) -> None:
    plan = plan_for(city(), store, BLOCK_S, BLOCK_S / 10)
    assert plan[0].node == "gateway" and plan[0].start == 0 and plan[0].end >= 1
    assert [s.node for s in plan[1:]] == ["edge1"] and plan[-1].end == 6


def test_the_declared_plan_follows_the_declared_speeds(store: ShardStore) -> None:
    plan = plan_for(city(edge1_speed=0.4, edge2_speed=1.0), store, BLOCK_S, BLOCK_S / 10)
    assert "edge2" in {s.node for s in plan} and "edge1" not in {s.node for s in plan}


def test_a_node_that_joins_later_is_not_in_the_first_plan(store: ShardStore) -> None:
    plan = declared_first_plan(city(), store, ["gateway", "edge2"])
    assert {s.node for s in plan} <= {"gateway", "edge2"} and plan[-1].end == 6


def test_a_declared_topology_without_a_feasible_plan_is_a_typed_error(store: ShardStore) -> None:
    from services.cli.client import NoFeasiblePlan

    # The entry holds the private block; with a few bytes of memory it can hold nothing.
    with pytest.raises(NoFeasiblePlan, match="no feasible plan"):
        plan_for(city(gateway_memory=10), store, BLOCK_S, BLOCK_S / 10)


def test_the_layout_round_trips_through_the_orchestrators_option() -> None:
    segments = (Segment(node="gateway", start=0, end=1), Segment(node="edge1", start=1, end=6))  # type: ignore[arg-type]
    assert format_layout(segments) == "gateway:0:1,edge1:1:6"
    assert parse_layout(format_layout(segments)) == segments


@pytest.mark.parametrize("text", ["", "x", "a:1:0", "a:0:x", "a:0:1,b:2:3", "a:0:1,,"])
def test_a_malformed_layout_is_refused_naming_the_option(text: str) -> None:
    if text == "a:0:1,,":
        assert parse_layout(text) == (Segment(node="a", start=0, end=1),)  # type: ignore[arg-type]
        return
    with pytest.raises(ConfigError, match="--first-plan"):
        parse_layout(text)


def _candidate(segments: tuple[Segment, ...], latency_s: float, violations: tuple[str, ...] = ()) -> CandidatePlan:
    return CandidatePlan(kind="resplit", segments=segments, latency_s=latency_s, bottleneck_s=latency_s,
                         violations=violations)  # fmt: skip


def test_the_pinned_plan_is_chosen_when_feasible_even_if_another_looks_faster() -> None:
    pinned = parse_layout("gateway:0:1,edge1:1:6")
    other = parse_layout("gateway:0:1,edge2:1:6")
    candidates = (_candidate(other, 0.010), _candidate(pinned, 0.012))
    assert [c.segments for c in pinned_first(candidates, pinned)] == [pinned]


def test_an_infeasible_pinned_plan_falls_back_to_every_candidate() -> None:
    pinned = parse_layout("gateway:0:1,edge1:1:6")
    other = parse_layout("gateway:0:1,edge2:1:6")
    candidates = (_candidate(other, 0.010), _candidate(pinned, 0.012, ("down: edge1",)))
    assert pinned_first(candidates, pinned) == candidates
    assert pinned_first(candidates[:1], pinned) == candidates[:1]  # not evaluated at all


def test_the_report_names_the_first_plan_served(tmp_path: Path) -> None:
    run = PolicyRun(policy="static", duration_s=10.0, nodes=("gateway", "edge1", "edge2"), placements=(
        Placement(0.0, "edge1", 1, 6, 1), Placement(0.0, "gateway", 0, 1, 1),
        Placement(5.0, "gateway", 0, 1, 2), Placement(5.0, "edge2", 1, 6, 2)))  # fmt: skip
    assert first_layout(run) == "gateway[0,1) edge1[1,6)"
    assert first_layout(PolicyRun(policy="static", duration_s=1.0, nodes=())) is None
