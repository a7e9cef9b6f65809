"""The orchestrator's pure decision: classification, threshold, cost, dwell, hysteresis,
emergency bypass, determinism, noise; and the candidates built from a live profile."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from services.orchestrator.candidates import build_candidates, migration_cost_s
from services.orchestrator.logic import (
    CandidatePlan,
    DecisionConfig,
    OrchestratorState,
    Trigger,
    after_commit,
    classify,
    decide,
)
from services.orchestrator.records import TpotTracker, merge, prediction_missed, record_of
from shared.messages import (
    CapacityProfile,
    LinkCapacity,
    NodeCapacity,
    PlanOption,
    PrivacyPolicy,
    RequestFinished,
    Segment,
)
from shared.model.shard import ShardManifest
from shared.planning.view import CostModel, planning_problem, planning_view

CONFIG = DecisionConfig(relative_threshold=0.15, dwell_s=15.0, min_horizon_tokens=100.0,
                        switch_overhead_s=0.1)  # fmt: skip


def plan(*triples: tuple[str, int, int]) -> tuple[Segment, ...]:
    return tuple(Segment(node=n, start=s, end=e) for n, s, e in triples)  # type: ignore[arg-type]


A = plan(("car", 0, 2), ("rsu", 2, 6))
A_MOVED = plan(("car", 0, 2), ("mec", 2, 6))
B = plan(("car", 0, 3), ("mec", 3, 6))


def cand(segments: tuple[Segment, ...], latency_s: float, kind: str = "resplit",
         cost_s: float = 0.0, violations: tuple[str, ...] = ()) -> CandidatePlan:  # fmt: skip
    return CandidatePlan(kind=kind, segments=segments, latency_s=latency_s, bottleneck_s=latency_s,  # type: ignore[arg-type]
                         migration_cost_s=cost_s, violations=violations)  # fmt: skip


def running(latency_s: float, violations: tuple[str, ...] = ()) -> CandidatePlan:
    return cand(A, latency_s, "current", violations=violations)


STATE = OrchestratorState(segments=A, epoch=3, changed_at_s=0.0)
PERIODIC = Trigger("periodic", 1000.0)


def test_classify() -> None:
    assert classify(A, A) == "keep"
    assert classify(A, A_MOVED) == "migrate"
    assert classify(A, B) == "resplit"
    assert classify((), A) == "resplit"


def test_initial_plan_takes_the_best_feasible_candidate() -> None:
    candidates = (cand(B, 0.02), cand(A, 0.01, violations=("trust: layer 0",)), cand(A_MOVED, 0.03))
    decision = decide(OrchestratorState(), Trigger("initial", 0.0), candidates, 0.0, CONFIG)
    assert decision.action == "resplit" and decision.chosen is not None
    assert decision.chosen.segments == B


def test_small_gain_keeps() -> None:
    decision = decide(STATE, PERIODIC, (running(0.010), cand(B, 0.0090)), 1000.0, CONFIG)
    assert decision.action == "keep" and "threshold" in decision.reason


def test_large_gain_migrates_or_resplits_by_cut_points() -> None:
    moved = decide(STATE, PERIODIC, (running(0.010), cand(A_MOVED, 0.005, "migrate")), 1000.0, CONFIG)
    assert moved.action == "migrate" and moved.chosen is not None and moved.chosen.segments == A_MOVED
    resplit = decide(STATE, PERIODIC, (running(0.010), cand(B, 0.005)), 1000.0, CONFIG)
    assert resplit.action == "resplit"
    # 100 tokens x 5 ms saved = 0.5 s gain; cost 0.1 s switch overhead.
    assert resplit.gain_s == pytest.approx(0.5) and resplit.cost_s == pytest.approx(0.1)


def test_cost_decides_between_migration_and_resplit() -> None:
    """The re-split is faster per token but its migration cost eats the gain: migrate."""
    candidates = (running(0.010), cand(A_MOVED, 0.006, "migrate", cost_s=0.05),
                  cand(B, 0.005, cost_s=0.40))  # fmt: skip
    decision = decide(STATE, PERIODIC, candidates, 1000.0, CONFIG)
    # migrate: 0.4 - 0.15 = 0.25 net; resplit: 0.5 - 0.5 = 0 net (not eligible)
    assert decision.action == "migrate"
    cheap = (running(0.010), cand(A_MOVED, 0.006, "migrate", cost_s=0.05), cand(B, 0.005, cost_s=0.01))
    assert decide(STATE, PERIODIC, cheap, 1000.0, CONFIG).action == "resplit"


def test_gain_that_does_not_beat_the_cost_keeps() -> None:
    decision = decide(STATE, PERIODIC, (running(0.010), cand(B, 0.005, cost_s=5.0)), 1000.0, CONFIG)
    assert decision.action == "keep" and "does not beat cost" in decision.reason


def test_horizon_grows_with_the_token_rate() -> None:
    candidates = (running(0.010), cand(B, 0.005, cost_s=5.0))
    busy = OrchestratorState(segments=A, epoch=3, changed_at_s=0.0, tokens_per_s=100.0)
    decision = decide(busy, PERIODIC, candidates, 1000.0, CONFIG)  # 3000 tokens x 5 ms = 15 s
    assert decision.action == "resplit" and decision.horizon_tokens == pytest.approx(3000.0)


def test_dwell_time_holds_a_change_back() -> None:
    state = OrchestratorState(segments=A, epoch=3, changed_at_s=995.0)
    candidates = (running(0.010), cand(B, 0.002))
    held = decide(state, PERIODIC, candidates, 1000.0, CONFIG)
    assert held.action == "keep" and "dwell" in held.reason
    assert decide(state, PERIODIC, candidates, 1011.0, CONFIG).action == "resplit"


def test_hard_violation_bypasses_threshold_and_dwell() -> None:
    state = OrchestratorState(segments=A, epoch=3, changed_at_s=999.0)
    gone = running(0.010, violations=("segments[1].node: unknown node 'rsu'",))
    node_down = Trigger("node_down", 1000.0, emergency=True, detail="rsu offline")
    decision = decide(state, node_down, (gone, cand(A_MOVED, 0.0099, "migrate", cost_s=9.0)), 1000.0, CONFIG)
    assert decision.emergency and decision.action == "migrate"
    stuck = decide(state, node_down, (gone, cand(B, 0.01, violations=("trust",))), 1000.0, CONFIG)
    assert stuck.action == "keep" and "no feasible plan" in stuck.reason


def test_emergency_flag_alone_does_not_bypass_when_the_plan_still_holds() -> None:
    """A node the plan does not use went down: the running plan is fine, normal rules apply."""
    decision = decide(STATE, Trigger("node_down", 1000.0, True), (running(0.010), cand(B, 0.0095)),
                      1000.0, CONFIG)  # fmt: skip
    assert decision.action == "keep" and not decision.emergency


def test_recent_change_raises_the_threshold() -> None:
    state = after_commit(STATE, A, 4, 1000.0)
    candidates = (running(0.010), cand(B, 0.0075))  # 25 %: above 15 %, below 30 %
    assert decide(state, PERIODIC, candidates, 1020.0, CONFIG).action == "keep"
    assert decide(state, PERIODIC, candidates, 1130.0, CONFIG).action == "resplit"


def test_a_missed_prediction_waives_dwell_and_hysteresis_but_not_the_threshold() -> None:
    """The last change was decided on a profile that had not caught up (requests ran far
    slower than predicted): the fresher profile's better plan is taken without waiting."""
    state = after_commit(STATE, A, 4, 1000.0)
    missed = Trigger("prediction_missed", 1003.0, detail="650 ms/token, predicted 85")
    candidates = (running(0.010), cand(B, 0.0075))  # 25 %: held by dwell and by the 30 % hysteresis
    assert decide(state, PERIODIC, candidates, 1003.0, CONFIG).action == "keep"
    assert decide(state, missed, candidates, 1003.0, CONFIG).action == "resplit"
    small = (running(0.010), cand(B, 0.0095))  # 5 %: below the threshold itself
    assert decide(state, missed, small, 1003.0, CONFIG).action == "keep"


def test_a_request_far_slower_than_predicted_under_the_running_plan_is_a_miss() -> None:
    def finished(tpot_s: float, tokens: int = 12, ttft_s: float = 0.3) -> RequestFinished:
        return RequestFinished(request_id="r1", token_ids=(), token_count=tokens, ttft_s=ttft_s, tpot_s=tpot_s,
                               finish_reason="length")  # type: ignore[arg-type]  # fmt: skip

    ran_s = 0.3 + 11 * 0.65  # a 12-token request at 650 ms per token
    trigger = prediction_missed(finished(0.65), 1000.0 + ran_s + 1.0, 1000.0, 0.085)
    assert trigger is not None and trigger.kind == "prediction_missed" and "650 ms/token" in trigger.detail
    assert prediction_missed(finished(0.15), 1010.0, 1000.0, 0.085) is None  # within 2 x
    assert prediction_missed(finished(0.65), 1000.0 + ran_s, 1000.0, 0.085) is None  # began before the switch settled
    assert prediction_missed(finished(0.65), 1100.0, None, 0.085) is None  # no change committed
    assert prediction_missed(finished(0.012), 1100.0, 1000.0, 0.004) is None  # 3 x but only 8 ms more


def test_decision_is_independent_of_candidate_order() -> None:
    candidates = [running(0.010), cand(B, 0.005), cand(A_MOVED, 0.005, "migrate"),
                  cand(plan(("car", 0, 6)), 0.005)]  # fmt: skip
    first = decide(STATE, PERIODIC, tuple(candidates), 1000.0, CONFIG)
    for seed in range(5):
        random.Random(seed).shuffle(candidates)
        again = decide(STATE, PERIODIC, tuple(candidates), 1000.0, CONFIG)
        assert again.chosen == first.chosen and again.action == first.action


@pytest.mark.parametrize("seed", range(20))
def test_noise_of_ten_percent_replans_at_most_once_a_minute(seed: int) -> None:
    """Three equally fast plans, each prediction off by up to +-10 % at every one-second
    evaluation for two minutes: at most one change in any 60 s."""
    rng = random.Random(seed)
    plans = (A, A_MOVED, B)
    state = OrchestratorState(segments=A, epoch=1, changed_at_s=-1000.0)
    changes: list[float] = []
    for second in range(120):
        now_s = float(second)
        noisy = [0.010 * rng.uniform(0.9, 1.1) for _ in plans]
        candidates = tuple(cand(p, t, "current" if p == state.segments else classify(state.segments, p))  # type: ignore[arg-type]
                           for p, t in zip(plans, noisy, strict=True))  # fmt: skip
        decision = decide(state, Trigger("periodic", now_s), candidates, now_s, CONFIG)
        if decision.changes_plan and decision.chosen is not None:
            changes.append(now_s)
            state = after_commit(state, decision.chosen.segments, (state.epoch or 0) + 1, now_s)
    assert all(later - earlier >= 60 for earlier, later in zip(changes, changes[1:], strict=False))


# --- candidates on a live profile -------------------------------------------------------


def manifest(architecture: str = "llama") -> ShardManifest:
    """Only the per-block costs the planner reads (a real manifest has more)."""
    blocks = tuple(SimpleNamespace(index=i, bytes=1000, parameters=250, flops_per_token=1e6,
                                   activation_bytes_per_token=256, kv_bytes_per_token=128)
                   for i in range(6))  # fmt: skip
    return ShardManifest.model_construct(model_name="tiny", num_blocks=6, blocks=blocks, architecture=architecture)


def node(name: str, trust: int, decode_s: float, alive: bool = True) -> NodeCapacity:
    return NodeCapacity(node=name, alive=alive, trust=trust, memory_free_bytes=10**9,  # type: ignore[arg-type]
                        flops_per_s=1e9, utilisation=0.5, decode_s_per_block=decode_s)  # fmt: skip


def profile(rsu_decode_s: float = 0.001, rsu_alive: bool = True) -> CapacityProfile:
    names = ("car", "rsu", "mec")
    links = tuple(LinkCapacity(src=a, dst=b, bandwidth_bytes_per_s=1e7, latency_s=0.001)  # type: ignore[arg-type]
                  for a in names for b in names if a != b)  # fmt: skip
    return CapacityProfile(as_of_s=1.0, nodes=(node("car", 2, 0.002), node("rsu", 1, rsu_decode_s, rsu_alive),
                                               node("mec", 0, 0.001)), links=links)  # fmt: skip


def candidates_for(prof: CapacityProfile, private: int = 2, options: tuple[PlanOption, ...] = ()):
    view = planning_view(prof, manifest(), A)
    problem = planning_problem(view, manifest(), PrivacyPolicy(trusted_level=2, private_blocks=private), "car",
                               CostModel(1e6, 0))  # fmt: skip
    return problem, build_candidates(problem, A, options, CostModel(1e6, 0))


def test_planning_view_uses_decode_time_and_no_utilisation() -> None:
    view = planning_view(profile(), manifest(), A)
    speeds = {n.node: (n.flops_per_s, n.utilisation) for n in view.nodes}
    assert speeds["rsu"] == (pytest.approx(1e6 / 0.001), 0.0)
    assert speeds["car"] == (pytest.approx(1e6 / 0.002), 0.0)


def test_held_blocks_count_as_free_only_once_the_node_reports_holding_them() -> None:
    """Just after a commit a node's telemetry may not show its new blocks yet, so the
    monitor has not subtracted them: adding them back then counted them twice."""
    def free_of(blocks_held: int | None) -> int:
        prof = profile()
        nodes = tuple(n.model_copy(update={"blocks_held": blocks_held}) if n.node == "rsu" else n
                      for n in prof.nodes)  # fmt: skip
        view = planning_view(prof.model_copy(update={"nodes": nodes}), manifest(), A)
        return next(n.memory_free_bytes for n in view.nodes if n.node == "rsu")

    assert free_of(0) == 10**9  # telemetry lags: nothing added
    assert free_of(4) == 10**9 + 4 * 1000  # rsu holds [2, 6) and says so
    assert free_of(None) == 10**9 + 4 * 1000  # an older monitor: the plan's count, as before


def test_an_encoders_planning_view_uses_prefill_time() -> None:
    """BERT serves one pass per request and never decodes: its nodes' decode times stay
    the start-up benchmark's, so a slowdown shows only in the prefill times."""
    slowed = profile().model_copy(update={"nodes": tuple(
        n.model_copy(update={"prefill_s_per_block_token": 0.0002 * (20 if n.node == "rsu" else 1)})
        for n in profile().nodes)})  # fmt: skip
    decoder = {n.node: n.flops_per_s for n in planning_view(slowed, manifest(), A).nodes}
    encoder = {n.node: n.flops_per_s for n in planning_view(slowed, manifest("bert"), A).nodes}
    assert decoder["rsu"] == pytest.approx(1e6 / 0.001)  # decode time: the slowdown is not seen
    assert encoder["rsu"] == pytest.approx(1e6 / 0.004) and encoder["mec"] == pytest.approx(1e6 / 0.0002)


def test_slow_node_makes_a_migration_win() -> None:
    """rsu gets 4x slower: moving its segment to mec (same cuts) is the better plan."""
    _, normal = candidates_for(profile())
    current = next(c for c in normal if c.kind == "current")
    _, slow = candidates_for(profile(rsu_decode_s=0.004))
    slow_current = next(c for c in slow if c.kind == "current")
    assert slow_current.latency_s > current.latency_s
    decision = decide(STATE, PERIODIC, slow, 1000.0, CONFIG)
    assert decision.action == "migrate" and decision.chosen is not None
    assert {s.node for s in decision.chosen.segments} == {"car", "mec"}


def test_down_node_makes_the_running_plan_infeasible() -> None:
    _, found = candidates_for(profile(rsu_alive=False))
    current = next(c for c in found if c.kind == "current")
    assert not current.feasible
    decision = decide(STATE, Trigger("node_down", 1.0, True), found, 1000.0, CONFIG)
    assert decision.emergency and decision.chosen is not None
    assert all(s.node != "rsu" for s in decision.chosen.segments)


def test_privacy_rule_is_never_broken_even_when_the_untrusted_node_is_fastest() -> None:
    options = tuple(PlanOption(segments=segments, latency_s=0.001, bottleneck_s=0.001,
                               migration_cost_s=0.0, weighted_cost_s=0.001)
                    for segments in (plan(("mec", 0, 6)), B))  # fmt: skip
    _, found = candidates_for(profile(), private=3, options=options)
    by_segments = {c.segments: c for c in found}
    assert not by_segments[plan(("mec", 0, 6))].feasible
    assert not by_segments[A].feasible  # rsu (trust 1) holds block 2, now private
    decision = decide(STATE, Trigger("policy_changed", 1.0, True), found, 1000.0, CONFIG)
    assert decision.chosen is not None and decision.chosen.segments == B
    for candidate in found:  # every plan that puts a private block off a trusted node is out
        if any(s.node != "car" and s.start < 3 for s in candidate.segments):
            assert not candidate.feasible


def test_migration_cost_counts_only_moved_blocks() -> None:
    problem, _ = candidates_for(profile())
    cost = CostModel(shard_load_bytes_per_s=1000.0, rebuild_tokens=0)
    assert migration_cost_s(problem, A, A, cost) == 0.0
    # blocks 2..5 move to mec: 4 blocks x max(1000 B, 4 x 250) / 1000 B/s
    assert migration_cost_s(problem, A, A_MOVED, cost) == pytest.approx(4.0)



def test_migration_cost_takes_the_kv_handoff_when_it_beats_recomputing() -> None:
    """A moved block's KV state can be handed over from its old host (rsu) to the new one
    (mec) over their link instead of being recomputed: the cost is the cheaper of the two."""
    problem, _ = candidates_for(profile())
    layers = tuple(layer.model_copy(update={"kv_bytes_per_token": 1000.0}) for layer in problem.layers)
    problem = problem.model_copy(update={"layers": layers})
    links = {(link.src, link.dst): link for link in problem.links}
    recompute = CostModel(shard_load_bytes_per_s=1e12, rebuild_tokens=1000)
    slow_handoff = problem.model_copy(update={"links": tuple(
        link.model_copy(update={"bandwidth_bytes_per_s": 1.0}) for link in problem.links)})  # fmt: skip
    by_compute = migration_cost_s(slow_handoff, A, A_MOVED, recompute)
    assert by_compute > 0
    rsu_mec = links[("rsu", "mec")]
    by_handoff = migration_cost_s(problem, A, A_MOVED, recompute)
    expected = 4 * (1000.0 * 1000 / rsu_mec.bandwidth_bytes_per_s + rsu_mec.latency_s)
    assert by_handoff == pytest.approx(min(by_compute, expected), rel=1e-6)
    assert by_handoff < by_compute

# --- records ------------------------------------------------------------------------------


def test_record_names_trigger_candidates_and_choice() -> None:
    candidates = (running(0.010), cand(A_MOVED, 0.005, "migrate", cost_s=0.05))
    trigger = merge([Trigger("link_degraded", 5.0, False, "car->rsu bandwidth"), Trigger("periodic", 6.0)])
    decision = decide(STATE, trigger, candidates, 1000.0, CONFIG)
    record = record_of(7, trigger, decision, 1000.0, 3, ("car", "rsu"))
    assert record.trigger == "link_degraded+periodic" and record.action == "migrate"
    assert record.chosen is not None and record.candidates[record.chosen].segments == A_MOVED
    assert record.candidates[0].kind == "current" and record.current_latency_s == pytest.approx(0.010)
    assert record.nodes == ("car", "mec") and record.outcome == "pending"
    assert record.predicted_cost_s == pytest.approx(0.15)


def test_tpot_tracker_splits_before_and_after() -> None:
    tracker = TpotTracker()
    finished = RequestFinished(request_id="r1", token_ids=(1, 2, 3), ttft_s=0.1, tpot_s=0.05)
    tracker.add(finished, 10.0)  # started at 9.8
    tracker.add(finished.model_copy(update={"tpot_s": 0.02}), 30.0)  # started at 29.86
    assert tracker.before(20.0, 15.0) == (pytest.approx(0.05), 1)
    assert tracker.after(20.0) == (pytest.approx(0.02), 1)
    assert tracker.tokens_per_s(30.0, 30.0) == pytest.approx(6 / 30)


# --- policies (edgesplit scenario run compares them) -----------------------------------------


def test_policies_restrict_what_may_change_after_the_first_plan() -> None:
    from services.orchestrator.logic import CandidatePlan, allowed

    def seg(node: str, start: int, end: int) -> Segment:
        return Segment(node=node, start=start, end=end)  # type: ignore[arg-type]

    running = (seg("a", 0, 2), seg("b", 2, 6))
    current = CandidatePlan("current", running, 1.0, 1.0)
    moved = CandidatePlan("migrate", (seg("a", 0, 2), seg("c", 2, 6)), 0.5, 0.5)
    recut = CandidatePlan("resplit", (seg("a", 0, 3), seg("c", 3, 6)), 0.4, 0.4)
    everything = (current, moved, recut)
    assert allowed("adaptive", running, everything) == everything
    assert allowed("migrate", running, everything) == (current, moved)
    assert allowed("static", running, everything) == (current,)
    for policy in ("adaptive", "migrate", "static"):  # the first plan is the planner's best
        assert allowed(policy, (), (moved, recut)) == (moved, recut)


def test_the_entry_fails_over_only_when_seen_down_not_while_still_starting() -> None:
    from services.orchestrator.candidates import failover_entry

    starting = profile().model_copy(update={"nodes": tuple(n for n in profile().nodes if n.node != "car")})
    assert failover_entry(starting, "car", 1) == "car"  # not in the profile yet: not down
    assert failover_entry(profile(), "rsu", 1) == "rsu"
    assert failover_entry(profile(rsu_alive=False), "rsu", 1) == "car"  # seen, now down
    assert failover_entry(profile(rsu_alive=False), "rsu", 3) is None
