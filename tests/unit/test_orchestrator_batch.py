"""The orchestrator plans for the expected load with batched stages: at C requests in
flight a node whose batch scaling s is measured runs a round of their steps as one
batched step, t x (1 + s (C - 1)), not C x t (`logic.per_token_s`); the reviser is asked
for plans at that batch, and the decision record names the load."""

from __future__ import annotations

import pytest

from services.orchestrator.candidates import build_candidates, serial_stages
from services.orchestrator.logic import Trigger, batched_round_s, decide, per_token_s
from services.orchestrator.records import record_of
from services.split_reviser.service import problem_for
from shared.messages import (
    CapacityProfile,
    LinkCapacity,
    NodeCapacity,
    PlanRequested,
    PrivacyPolicy,
)
from shared.planning.view import CostModel, expected_load, planning_problem, planning_view
from tests.unit.test_orchestrator_logic import A_MOVED, CONFIG, PERIODIC, STATE, A, manifest

POLICY = PrivacyPolicy(trusted_level=2, private_blocks=2)


def test_a_round_on_a_measured_node_is_one_batched_step() -> None:
    stages = ((0.004, 0.2), (0.001, None))  # a node (s = 0.2) and a link
    assert batched_round_s(stages, 8) == pytest.approx(max(0.004 * (1 + 0.2 * 7), 8 * 0.001))
    assert per_token_s(0.007, 0.004, 8, stages) == pytest.approx(0.0096)
    assert per_token_s(0.012, 0.004, 8, stages) == 0.012  # one request alone takes longer
    assert per_token_s(0.007, 0.004, 1, stages) == 0.007  # a round of one is one step
    # nothing measured: C x the slowest stage, the formula before batching, bit for bit
    unmeasured = ((0.004, None), (0.001, None))
    assert per_token_s(0.007, 0.004, 8, unmeasured) == max(0.007, 8.0 * 0.004)
    assert per_token_s(0.007, 0.004, 8) == max(0.007, 8.0 * 0.004)


def capacity(name: str, trust: int, decode_s: float, scaling: float | None, in_flight: int = 0) -> NodeCapacity:
    return NodeCapacity(node=name, alive=True, trust=trust, memory_free_bytes=10**9,  # type: ignore[arg-type]
                        flops_per_s=1e9, utilisation=0.0, decode_s_per_block=decode_s,
                        decode_batch_scaling=scaling, requests_in_flight=in_flight)  # fmt: skip


def batch_profile(rsu_scaling: float | None, mec_scaling: float | None, in_flight: int = 0) -> CapacityProfile:
    """car (trusted entry, 0.5 ms a block), rsu (1 ms a block) and mec (1.5 ms a block)."""
    names = ("car", "rsu", "mec")
    links = tuple(LinkCapacity(src=a, dst=b, bandwidth_bytes_per_s=1e7, latency_s=0.001)  # type: ignore[arg-type]
                  for a in names for b in names if a != b)  # fmt: skip
    nodes = (capacity("car", 2, 0.0005, 0.1, in_flight), capacity("rsu", 1, 0.001, rsu_scaling),
             capacity("mec", 0, 0.0015, mec_scaling))  # fmt: skip
    return CapacityProfile(as_of_s=1.0, nodes=nodes, links=links)


def decide_at(prof: CapacityProfile):  # type: ignore[no-untyped-def]
    view = planning_view(prof, manifest(), A)
    cost = CostModel.at_load(view, "car", 1e6, 0)
    problem = planning_problem(view, manifest(), POLICY, "car", cost)
    found = build_candidates(problem, A, (), cost)
    return problem, found, decide(STATE, PERIODIC, found, 1000.0, CONFIG)


def test_eight_requests_move_the_work_to_the_node_that_batches_well() -> None:
    """rsu is faster alone but gains nothing from batching (s = 1); mec is 1.5 x slower
    alone and batches well (s = 0.1). One request keeps rsu; eight move to mec, whose
    round of eight steps takes 6 ms x 1.7 against rsu's 4 ms x 8."""
    problem, found, alone = decide_at(batch_profile(1.0, 0.1, in_flight=1))
    assert alone.action == "keep"
    assert problem.expected_batch is None  # the candidates' own latency is one request's
    _, found, busy = decide_at(batch_profile(1.0, 0.1, in_flight=8))
    current = next(c for c in found if c.kind == "current")
    assert current.latency_s == pytest.approx(8 * 4 * 0.001)  # rsu: no gain, 8 x 4 ms
    assert busy.action == "migrate" and busy.chosen is not None and busy.chosen.segments == A_MOVED
    assert busy.chosen.latency_s == pytest.approx(4 * 0.0015 * (1 + 0.1 * 7))
    # without a measured scaling the same load keeps rsu: 8 x 4 ms against 8 x 6 ms
    _, _, unmeasured = decide_at(batch_profile(None, None, in_flight=8))
    assert unmeasured.action == "keep"


def test_candidates_carry_each_stage_with_its_nodes_scaling() -> None:
    view = planning_view(batch_profile(1.0, 0.1), manifest(), A)
    problem = planning_problem(view, manifest(), POLICY, "car", CostModel(1e6, 0))
    stages = serial_stages(problem, A_MOVED)
    scalings = [scaling for _, scaling in stages]
    assert scalings == [0.1, None, 0.1, None]  # car, car -> mec, mec, mec -> car
    assert stages[2][0] == pytest.approx(4 * 0.0015)


def test_the_load_is_the_entrys_requests_in_flight_and_the_record_names_it() -> None:
    assert expected_load(batch_profile(None, None, in_flight=0), "car") == 1.0
    assert expected_load(batch_profile(None, None, in_flight=6), "car") == 6.0
    _, _, decision = decide_at(batch_profile(1.0, 0.1, in_flight=8))
    record = record_of(7, PERIODIC, decision, 1000.0, 3, ("car", "rsu"), load=8.0)
    assert record.reason.startswith("migrate: ") and record.reason.endswith("[planned for 8 requests in flight]")
    one = record_of(7, Trigger("periodic", 1.0), decision, 1000.0, 3, ("car", "rsu"), load=1.0)
    assert one.reason.endswith("[planned for 1 request in flight]")
    assert record_of(7, PERIODIC, decision, 1000.0, 3, ("car", "rsu")).reason == decision.reason


def test_the_reviser_plans_at_the_requested_batch() -> None:
    view = planning_view(batch_profile(1.0, 0.1), manifest(), A)
    request = PlanRequested(request_id="r1", reply_to="orchestrator", model_id="tiny", source="car",  # type: ignore[arg-type]
                            profile=view, privacy=POLICY, expected_batch=8.0)  # fmt: skip
    problem = problem_for(request, manifest())
    assert problem.expected_batch == 8.0
    assert {n.id: n.batch_scaling for n in problem.nodes} == {"car": 0.1, "mec": 0.1, "rsu": 1.0}
    unbatched = problem_for(request.model_copy(update={"expected_batch": 1.0}), manifest())
    assert unbatched.expected_batch is None  # 1: the contract's problem
