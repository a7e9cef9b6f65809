"""Live profile -> planning problem (shared/planning/live.py) and the reviser's
pure answer (service.propose): field mapping, down nodes, privacy, JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.split_reviser.service import propose
from shared.messages import (
    CapacityProfile,
    LinkCapacity,
    NodeCapacity,
    PlanRequested,
    PlanWeights,
    PrivacyPolicy,
    Segment,
)
from shared.model.shard import ShardManifest, ShardStore, write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.planning.live import (
    LiveProfileError,
    layers_from_manifest,
    problem_from_profile,
    problem_to_json,
)
from shared.planning.problem import evaluate, parse_problem
from shared.planning.solver import solve

NO_POLICY = PrivacyPolicy(trusted_level=0)
POLICY = PrivacyPolicy(trusted_level=2, private_blocks=2)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> ShardManifest:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint("llama", root / "ckpt", layers=6, seed=0)
    write_shards(root / "ckpt", root / "shards", model_name="tiny-llama")
    return ShardStore(root / "shards").manifest


def capacity(node: str, trust: int, memory: float, flops: float, util: float = 0.0,
             alive: bool = True) -> NodeCapacity:  # fmt: skip
    return NodeCapacity(node=node, alive=alive, trust=trust, memory_free_bytes=int(memory),  # type: ignore[arg-type]
                        flops_per_s=flops, utilisation=util)  # fmt: skip


def link(src: str, dst: str, bandwidth: float, latency_s: float) -> LinkCapacity:
    return LinkCapacity(src=src, dst=dst, bandwidth_bytes_per_s=bandwidth, latency_s=latency_s)  # type: ignore[arg-type]


def both_ways(a: str, b: str, bandwidth: float, latency_s: float) -> tuple[LinkCapacity, ...]:
    return link(a, b, bandwidth, latency_s), link(b, a, bandwidth, latency_s)


def profile_of(block_bytes: float) -> CapacityProfile:
    """car (trusted source, room for 3 blocks), rsu, mec, and a fast node that is down."""
    return CapacityProfile(
        as_of_s=1.7e9,
        nodes=(
            capacity("car", 2, 3.5 * block_bytes, 5e8, 0.1),
            capacity("rsu", 1, 4.5 * block_bytes, 1e9, 0.2),
            capacity("mec", 0, 100 * block_bytes, 4e9, 0.5),
            capacity("fast", 2, 100 * block_bytes, 1e12, 0.0, alive=False),
        ),
        links=(*both_ways("car", "rsu", 12.5e6, 0.002), *both_ways("rsu", "mec", 125e6, 0.001),
               *both_ways("car", "mec", 2.5e6, 0.010), *both_ways("car", "fast", 1e9, 0.0001)),
    )  # fmt: skip


def block_bytes(manifest: ShardManifest) -> float:
    return max(layer.weight_bytes for layer in layers_from_manifest(manifest))


def test_layers_come_from_the_manifest(manifest: ShardManifest) -> None:
    problem = problem_from_profile(profile_of(block_bytes(manifest)), manifest, NO_POLICY, source="car")
    assert len(problem.layers) == manifest.num_blocks == 6
    for layer, block in zip(problem.layers, manifest.blocks, strict=True):
        assert layer.flops == block.flops_per_token > 0
        assert layer.weight_bytes == max(block.bytes, 4 * block.parameters) >= block.bytes
        assert layer.kv_bytes_per_token == block.kv_bytes_per_token > 0
        assert layer.out_bytes == block.activation_bytes_per_token == 64 * 4  # hidden 64, fp32
        assert layer.min_trust == 0
    assert problem.input_bytes == 64 * 4 and problem.source == "car"


def test_nodes_and_links_come_from_the_profile(manifest: ShardManifest) -> None:
    profile = profile_of(block_bytes(manifest))
    problem = problem_from_profile(profile, manifest, NO_POLICY, "throughput", source="car",
                                   context_tokens=128, concurrent_requests=2)  # fmt: skip
    assert (problem.objective, problem.context_tokens, problem.concurrent_requests) == ("throughput", 128, 2)
    nodes = problem.node_index()
    for measured in profile.nodes[:3]:
        node = nodes[measured.node]
        assert (node.trust, node.memory_bytes, node.flops_per_s, node.utilization) == (
            measured.trust, measured.memory_free_bytes, measured.flops_per_s, measured.utilisation)
    links = problem.link_index()
    assert set(links) == {(a, b) for a in ("car", "rsu", "mec") for b in ("car", "rsu", "mec") if a != b}
    assert (links["car", "rsu"].bandwidth_bytes_per_s, links["car", "rsu"].latency_s) == (12.5e6, 0.002)


def test_down_nodes_and_their_links_are_left_out(manifest: ShardManifest) -> None:
    profile = profile_of(block_bytes(manifest))
    problem = problem_from_profile(profile, manifest, NO_POLICY, source="car")
    assert "fast" not in problem.node_index()
    assert all("fast" not in (link.src, link.dst) for link in problem.links)
    alive = profile.model_copy(update={"nodes": tuple(
        n.model_copy(update={"alive": True}) for n in profile.nodes)})  # fmt: skip
    revived = problem_from_profile(alive, manifest, NO_POLICY, source="car")
    assert "fast" in {seg.node for seg in solve(revived).segments}  # it would be used if up
    assert "fast" not in {seg.node for seg in solve(problem).segments}


def test_unmeasured_nodes_host_nothing_and_zero_bandwidth_links_are_dropped(manifest: ShardManifest) -> None:
    size = block_bytes(manifest)
    profile = CapacityProfile(
        as_of_s=0.0,
        nodes=(capacity("car", 2, 100 * size, 0.0), capacity("rsu", 1, 100 * size, 1e9),
               capacity("new", 1, 100 * size, 0.0)),
        links=(*both_ways("car", "rsu", 1e7, 0.001), *both_ways("car", "new", 1e7, 0.001)),
    )  # fmt: skip
    problem = problem_from_profile(profile, manifest, NO_POLICY, source="car")
    assert set(problem.node_index()) == {"car", "rsu"}
    assert problem.node("car").utilization == 1.0  # the source is kept but hosts no block
    result = solve(problem)
    assert [(s.node, s.start, s.end) for s in result.segments] == [("rsu", 0, 6)]
    silent = profile.model_copy(update={"links": (link("car", "rsu", 1e7, 0.001),
                                                  link("rsu", "car", 0.0, 0.001))})  # fmt: skip
    dropped = problem_from_profile(silent, manifest, NO_POLICY, source="car")
    assert set(dropped.link_index()) == {("car", "rsu")}
    assert not solve(dropped).feasible  # no way back to the source


@pytest.mark.parametrize(("change", "message"), [
    ({"source": "nowhere"}, "source: 'nowhere' is not in the capacity profile"),
    ({"source": "fast"}, "source: 'fast' is down"),
    ({"extra_link": ("car", "rsu")}, r"profile.links\[8\]: duplicate link 'car' -> 'rsu'"),
    ({"extra_link": ("car", "car")}, r"profile.links\[8\]: a link from 'car' to itself"),
    ({"extra_node": "rsu"}, r"profile.nodes\[4\].node: duplicate node 'rsu'"),
])  # fmt: skip
def test_bad_profiles_name_the_field(manifest: ShardManifest, change: dict, message: str) -> None:
    profile = profile_of(block_bytes(manifest))
    if "extra_link" in change:
        src, dst = change["extra_link"]
        profile = profile.model_copy(update={"links": (*profile.links, link(src, dst, 1e6, 0.0))})
    if "extra_node" in change:
        profile = profile.model_copy(update={"nodes": (*profile.nodes, capacity(change["extra_node"], 0, 1, 1))})
    with pytest.raises(LiveProfileError, match=message):
        problem_from_profile(profile, manifest, NO_POLICY, source=change.get("source", "car"))


def test_the_privacy_policy_is_a_hard_rule(manifest: ShardManifest) -> None:
    profile = profile_of(block_bytes(manifest))
    problem = problem_from_profile(profile, manifest, POLICY, source="car")
    assert [layer.min_trust for layer in problem.layers] == [2, 2, 0, 0, 0, 0]
    assert problem.source_min_trust == 2
    free = solve(problem_from_profile(profile, manifest, NO_POLICY, source="rsu"), alternatives=4)
    assert any(seg.node == "mec" and seg.start < 2 for plan in (free, *free.alternatives)
               for seg in plan.segments)  # without the policy, mec takes early blocks
    result = solve(problem, alternatives=8)
    for plan in (result, *result.alternatives):
        assert not evaluate(problem, plan.placement).violations
        assert all(problem.node(seg.node).trust >= 2 for seg in plan.segments if seg.start < 2)
    untrusted = solve(problem_from_profile(profile, manifest, POLICY, source="rsu"))
    assert not untrusted.feasible and "trust" in (untrusted.reason or "")


def test_problem_json_round_trips_through_parse_problem(manifest: ShardManifest, tmp_path: Path) -> None:
    problem = problem_from_profile(profile_of(block_bytes(manifest)), manifest, POLICY,
                                   "throughput", source="car", context_tokens=64)  # fmt: skip
    data = problem_to_json(problem)
    assert data["source_min_trust"] == 2 and "preferred_trust" not in data["layers"][0]
    file = tmp_path / "problem.json"
    file.write_text(json.dumps(data))
    parsed = parse_problem(json.loads(file.read_text()))
    assert parsed == problem
    assert solve(parsed).to_json() == solve(problem).to_json()


def request(manifest: ShardManifest, **fields: object) -> PlanRequested:
    values: dict[str, object] = {
        "request_id": "p1", "reply_to": "orchestrator", "model_id": manifest.model_name,
        "source": "car", "profile": profile_of(block_bytes(manifest)), "privacy": POLICY,
        "alternatives": 4, "context_tokens": 64, **fields,
    }  # fmt: skip
    return PlanRequested(**values)  # type: ignore[arg-type]


def test_propose_answers_with_the_solver_plan_and_sorted_alternatives(manifest: ShardManifest) -> None:
    answer = propose(request(manifest), manifest)
    problem = problem_from_profile(profile_of(block_bytes(manifest)), manifest, POLICY,
                                   source="car", context_tokens=64)  # fmt: skip
    expected = solve(problem, alternatives=4)
    assert answer.feasible and answer.best is not None and answer.error is None
    assert [(s.node, s.start, s.end) for s in answer.best.segments] == [
        (s.node, s.start, s.end) for s in expected.segments]
    assert answer.best.latency_s == expected.predicted.latency_s  # type: ignore[union-attr]
    options = [answer.best, *answer.alternatives]
    assert len(options) == 5 and len({o.segments for o in options}) == 5
    assert [o.latency_s for o in options] == sorted(o.latency_s for o in options)
    assert all(o.migration_cost_s > 0 for o in options)  # nothing loaded: KV rebuilt for 64 tokens
    moved = propose(request(manifest, current_segments=answer.best.segments), manifest)
    assert moved.best is not None and moved.best.migration_cost_s == 0.0
    assert all(o.migration_cost_s > 0 for o in moved.alternatives)


def test_propose_with_weights_counts_migration(manifest: ShardManifest) -> None:
    first = propose(request(manifest), manifest)
    assert first.best is not None and len(first.alternatives) >= 1
    current = first.alternatives[0].segments
    sticky = propose(request(manifest, current_segments=current,
                             weights=PlanWeights(migration=1.0)), manifest)  # fmt: skip
    assert sticky.best is not None and sticky.best.segments == current
    assert sticky.best.weighted_cost_s == pytest.approx(sticky.best.latency_s)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"model_id": "other"}, "model_id: 'other' is not served"),
    ({"source": "fast"}, "source: 'fast' is down"),
    ({"method": "exact", "current_segments": (Segment(node="x", start=0, end=1),)}, None),  # type: ignore[arg-type]
])  # fmt: skip
def test_propose_refuses_what_it_cannot_plan(manifest: ShardManifest, fields: dict, reason: str | None) -> None:
    answer = propose(request(manifest, **fields), manifest)
    if reason is None:  # an unknown node in the current plan is just "not loaded there"
        assert answer.feasible
        return
    assert not answer.feasible and answer.error == "invalid_request" and reason in answer.reason


def test_an_infeasible_problem_is_an_answer_not_an_error(manifest: ShardManifest) -> None:
    answer = propose(request(manifest, privacy=PrivacyPolicy(trusted_level=3, private_blocks=2)), manifest)
    assert not answer.feasible and answer.error is None and "trust" in answer.reason


def test_propose_searches_with_the_requests_precision_policy(manifest: ShardManifest) -> None:
    """A request carrying a precision policy is solved with it: over a 20 kB/s link the
    best plan is priced with compressed hops, the same answer the solver gives that
    problem; without one, exact (fp32) as before."""
    from shared.planning.precision import PrecisionPolicy

    policy = PrecisionPolicy(activations=("fp32", "int8"), activation_loss={"int8": 0.01}, quality_budget=0.05)
    slow = profile_of(block_bytes(manifest)).model_copy(update={"links": (
        *both_ways("car", "rsu", 20e3, 0.002), *both_ways("rsu", "mec", 125e6, 0.001),
        *both_ways("car", "mec", 20e3, 0.010))})  # fmt: skip
    exact = propose(request(manifest, profile=slow), manifest)
    compressed = propose(request(manifest, profile=slow, precision=policy), manifest)
    problem = problem_from_profile(slow, manifest, POLICY, source="car", context_tokens=64)
    expected = solve(problem.model_copy(update={"precision": policy}), alternatives=4)
    assert exact.best is not None and compressed.best is not None and expected.predicted is not None
    assert compressed.best.latency_s == pytest.approx(expected.predicted.latency_s)
    assert compressed.best.latency_s < exact.best.latency_s  # the slow hops travel as int8
    assert exact.best.latency_s == pytest.approx(solve(problem, alternatives=4).predicted.latency_s)  # type: ignore[union-attr]
