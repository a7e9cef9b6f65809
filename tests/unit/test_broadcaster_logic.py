"""The broadcaster's pure state machine: two-phase rollouts, idempotence, epoch numbering."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.broadcaster.logic import (
    Acked,
    BroadcastConfig,
    BroadcastState,
    Deadline,
    Event,
    LedgerSeen,
    NodeBack,
    NodeLost,
    PlanSeen,
    Publish,
    Requested,
    apply,
    recover,
    shutdown,
    validate,
)
from shared.messages import (
    AbortEpoch,
    CommitEpoch,
    EpochLedger,
    EpochReady,
    EpochRejected,
    Plan,
    PrepareEpoch,
    RolloutFinished,
    RolloutRequested,
    Segment,
)
from shared.topics import EPOCH_COMMANDS, PLAN, ROLLOUT_LEDGER, ROLLOUT_RESULTS

KEY = "test-key"
CONFIG = BroadcastConfig(signing_key=KEY, num_layers=4, max_queued=2)
NODES = ("car", "rsu", "mec")


def plan(*segments: tuple[str, int, int], entry: str = "car", epoch: int = 0) -> Plan:
    return Plan(epoch=epoch, model_id="m", entry_node=entry,  # type: ignore[arg-type]
                segments=tuple(Segment(node=n, start=s, end=e) for n, s, e in segments))  # type: ignore[arg-type]  # fmt: skip


MOVED = plan(("car", 0, 2), ("rsu", 2, 3), ("mec", 3, 4))
OTHER = plan(("car", 0, 1), ("rsu", 1, 2), ("mec", 2, 4))


def request(decision_id: int = 1, target: Plan = MOVED, timeout_s: float = 5.0) -> Requested:
    message = RolloutRequested(decision_id=decision_id, plan=target, ready_timeout_s=timeout_s)
    return Requested(message, now_s=100.0)


def ready(node: str, epoch: int, now_s: float = 101.0) -> Acked:
    return Acked(EpochReady(epoch=epoch, node=node), now_s)  # type: ignore[arg-type]


def rejected(node: str, epoch: int, reason: str = "sha256 mismatch") -> Acked:
    return Acked(EpochRejected(epoch=epoch, node=node, reason=reason), 101.0)  # type: ignore[arg-type]


def run(state: BroadcastState, *events: Event) -> tuple[BroadcastState, list[Publish]]:
    actions: list[Publish] = []
    for event in events:
        state, more = apply(state, event)
        actions.extend(more)
    return state, actions


def kinds(actions: list[Publish]) -> list[str]:
    return [action.message.kind for action in actions]


def results(actions: list[Publish]) -> list[RolloutFinished]:
    return [a.message for a in actions if isinstance(a.message, RolloutFinished)]


def start(committed: int = 3) -> BroadcastState:
    state, actions = recover(CONFIG, plan(("car", 0, 4), epoch=committed).sign(KEY), None)
    assert actions == ()
    return state


# --- the happy path ------------------------------------------------------------------------


def test_request_prepares_the_next_epoch_with_a_signed_plan() -> None:
    state, actions = run(start(3), request(timeout_s=7.0))
    assert kinds(actions) == ["EpochLedger", "PrepareEpoch"]
    ledger, prepare = actions[0], actions[1]
    assert ledger.topic is ROLLOUT_LEDGER and ledger.message == EpochLedger(
        highest_epoch=4, in_progress=4, decision_id=1, previous_epoch=3)  # fmt: skip
    assert prepare.topic is EPOCH_COMMANDS and isinstance(prepare.message, PrepareEpoch)
    assert prepare.message.epoch == prepare.message.plan.epoch == 4
    assert prepare.message.ready_timeout_s == 7.0
    assert prepare.message.plan.signature_ok(KEY) and not prepare.message.plan.signature_ok("x")
    assert prepare.message.plan.segments == MOVED.segments
    assert state.active is not None and state.active.nodes == set(NODES)
    assert state.next_deadline_s == 107.0 and state.committed_epoch == 3


@pytest.mark.parametrize(
    "order", [("car", "rsu", "mec"), ("mec", "car", "rsu"), ("rsu", "mec", "car")]
)
def test_all_ready_commits_in_any_order(order: tuple[str, ...]) -> None:
    state, prepared = run(start(3), request())
    state, actions = run(state, *(ready(node, 4, now_s=100.5 + i) for i, node in enumerate(order)))
    assert kinds(actions) == ["Plan", "CommitEpoch", "EpochLedger", "RolloutFinished"]
    assert actions[0].topic is PLAN and actions[0].message == prepared[1].message.plan  # type: ignore[attr-defined]
    assert actions[1].message == CommitEpoch(epoch=4)
    assert actions[2].message == EpochLedger(highest_epoch=4)
    assert results(actions) == [RolloutFinished(decision_id=1, epoch=4, previous_epoch=3,
                                                outcome="committed", prepare_s=2.5)]  # fmt: skip
    assert actions[3].topic is ROLLOUT_RESULTS
    assert state.committed_epoch == 4 and state.active is None and state.next_deadline_s is None


def test_no_commit_until_the_last_node_and_the_entry_counts() -> None:
    entry_only = plan(("rsu", 0, 4), entry="car")
    state, _ = run(start(), request(target=entry_only))
    state, actions = run(state, ready("rsu", 4))
    assert actions == [] and state.active is not None
    state, actions = run(state, ready("car", 4))
    assert "CommitEpoch" in kinds(actions)


# --- abort ---------------------------------------------------------------------------------


def test_a_nack_aborts_naming_the_node_and_its_reason() -> None:
    state, _ = run(start(3), request())
    state, actions = run(
        state, ready("car", 4), rejected("mec", 4, "block-002: sha256 x does not match")
    )
    assert kinds(actions) == ["AbortEpoch", "EpochLedger", "RolloutFinished"]
    assert isinstance(actions[0].message, AbortEpoch) and actions[0].message.epoch == 4
    (result,) = results(actions)
    assert result.outcome == "aborted" and result.epoch == 4 and result.previous_epoch == 3
    assert "mec" in result.reason and "sha256" in result.reason
    assert actions[1].message == EpochLedger(highest_epoch=4)
    assert state.committed_epoch == 3 and state.active is None


def test_the_deadline_aborts_naming_the_silent_nodes() -> None:
    state, _ = run(start(3), request(timeout_s=5.0))
    state, actions = run(state, ready("car", 4), Deadline(104.9))
    assert actions == []  # not yet
    state, actions = run(state, Deadline(105.0))
    (result,) = results(actions)
    assert result.outcome == "aborted" and result.reason == "no answer from mec, rsu within 5 s"
    assert result.prepare_s == 5.0 and "AbortEpoch" in kinds(actions)
    state, actions = run(state, Deadline(200.0), ready("mec", 4), rejected("rsu", 4))
    assert actions == [] and state.committed_epoch == 3


def test_a_node_of_the_rollout_going_down_aborts_at_once() -> None:
    """Measured 2026-12-06 (test_second_kill_during_recovery, 1 run in 5 failed): a node
    killed right after a PREPARE that named it left the rollout waiting its 60 s READY
    deadline while every request timed out; now its Last Will or NodeDown aborts it."""
    state, _ = run(start(3), request(timeout_s=60.0), ready("car", 4))
    state, actions = run(state, NodeLost("spare", "offline", 101.5))  # not in the plan
    assert actions == [] and state.active is not None
    state, actions = run(state, NodeLost("rsu", "offline", 102.0))
    assert kinds(actions) == ["AbortEpoch", "EpochLedger", "RolloutFinished"]
    (result,) = results(actions)
    assert result.outcome == "aborted" and result.reason == "rsu went down (offline) during the rollout of epoch 4"
    assert state.active is None and state.committed_epoch == 3
    state, actions = run(state, NodeLost("rsu", "heartbeat_timeout", 103.0))
    assert actions == []  # nothing waits any more


def test_a_rollout_naming_a_node_already_down_is_refused_until_it_is_back() -> None:
    """Measured 2026-12-07 (test_second_kill_during_recovery, 1 run in 6 after the fix
    above): the re-plan around the first victim was requested 45 ms after the second
    one's Last Will, and its PREPARE waited for the dead node."""
    state, actions = run(start(3), NodeLost("rsu", "offline", 99.0), request(timeout_s=60.0))
    (result,) = results(actions)
    assert kinds(actions) == ["RolloutFinished"] and result.outcome == "aborted"
    assert result.epoch == result.previous_epoch == 3 and result.reason == "rsu down before the rollout started"
    assert state.active is None and state.highest_epoch == 3  # no epoch spent
    state, actions = run(state, NodeBack("rsu"), request(2, OTHER))
    assert kinds(actions) == ["EpochLedger", "PrepareEpoch"]


def test_an_aborted_epoch_is_burned() -> None:
    state, _ = run(start(3), request(1), rejected("rsu", 4))
    state, actions = run(state, request(2, OTHER))
    prepare = actions[1].message
    assert isinstance(prepare, PrepareEpoch) and prepare.epoch == 5
    assert results(run(state, *(ready(n, 5) for n in NODES))[1])[0].previous_epoch == 3


# --- duplicates and reordering ---------------------------------------------------------------


def test_duplicated_and_foreign_acks_are_harmless() -> None:
    state, _ = run(start(3), request())
    noise = [ready("car", 3), ready("car", 5), ready("stranger", 4), rejected("mec", 3),
             rejected("stranger", 4), ready("car", 4), ready("car", 4), ready("rsu", 4)]  # fmt: skip
    state, actions = run(state, *noise)
    assert actions == [] and state.active is not None and state.active.ready == {"car", "rsu"}
    state, actions = run(state, ready("mec", 4), ready("mec", 4), rejected("car", 4), Deadline(1e9))
    assert kinds(actions).count("CommitEpoch") == 1 and "AbortEpoch" not in kinds(actions)


def test_a_duplicated_request_is_ignored_while_active_queued_and_after() -> None:
    state, first = run(start(3), request(1))
    state, actions = run(state, request(1), request(2, OTHER), request(2, OTHER))
    assert actions == [] and len(state.queue) == 1
    state, actions = run(state, *(ready(n, 4) for n in NODES))
    assert kinds(actions)[-2:] == ["EpochLedger", "PrepareEpoch"]  # decision 2 starts, epoch 5
    state, actions = run(state, request(1), request(2, OTHER))
    assert actions == [] and state.queue == ()
    state, actions = run(state, request(1, OTHER))  # same id, another plan: a new rollout
    assert len(state.queue) == 1


def test_requests_queue_in_order_up_to_the_bound() -> None:
    third = plan(("car", 0, 3), ("mec", 3, 4))
    state, _ = run(start(3), request(1), request(2, OTHER), request(3, third))
    state, actions = run(state, request(4, plan(("mec", 0, 4))))
    (refused,) = results(actions)
    assert (
        refused.decision_id == 4 and refused.outcome == "aborted" and "bound is 2" in refused.reason
    )
    assert refused.epoch == refused.previous_epoch == 3
    state, actions = run(state, rejected("car", 4))
    started = [a.message for a in actions if isinstance(a.message, PrepareEpoch)]
    assert [p.epoch for p in started] == [5] and started[0].plan.segments == OTHER.segments
    state, actions = run(state, Deadline(1e9))
    started = [a.message for a in actions if isinstance(a.message, PrepareEpoch)]
    assert [p.epoch for p in started] == [6] and started[0].plan.segments == third.segments


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segments", "problem"),
    [
        ((("car", 0, 1), ("rsu", 2, 4)), "starts at 2, expected 1"),
        ((("car", 1, 4),), "starts at 1, expected 0"),
        ((("car", 0, 2), ("rsu", 1, 4)), "starts at 1, expected 2"),
        ((("car", 0, 2), ("rsu", 2, 3)), "end at block 3; the model has 4"),
        ((("car", 0, 2), ("car", 2, 4)), "holds two segments"),
        ((("car", 0, 3), ("rsu", 3, 5)), "end at block 5; the model has 4"),
    ],
)
def test_an_invalid_plan_is_refused_without_touching_workers(segments: Any, problem: str) -> None:
    state, actions = run(start(3), request(9, plan(*segments)))
    assert [a.topic for a in actions] == [ROLLOUT_RESULTS]
    (refused,) = results(actions)
    assert refused.outcome == "aborted" and problem in refused.reason, refused.reason
    assert refused.epoch == refused.previous_epoch == 3
    assert state.active is None and state.highest_epoch == 3


def test_without_a_manifest_the_plan_gives_its_own_length() -> None:
    assert validate(plan(("car", 0, 3), ("rsu", 3, 7)), None) is None
    assert validate(plan(("car", 0, 3), ("rsu", 3, 7)), 4) is not None
    assert "expected 0" in (validate(plan(("car", 2, 7)), None) or "")


# --- plans seen, restart, stop ---------------------------------------------------------------


def test_plans_seen_track_the_committed_epoch() -> None:
    state, actions = run(start(3), PlanSeen(plan(("car", 0, 4), epoch=2), 0.0),
                         PlanSeen(plan(("car", 0, 4), epoch=6), 0.0))  # fmt: skip
    assert actions == [] and state.committed_epoch == 6 and state.highest_epoch == 6
    state, actions = run(state, LedgerSeen(EpochLedger(highest_epoch=9)), request())
    assert isinstance(actions[1].message, PrepareEpoch) and actions[1].message.epoch == 10


def test_our_own_committed_plan_echo_changes_nothing() -> None:
    state, actions = run(start(3), request(), *(ready(n, 4) for n in NODES))
    (echo,) = [a.message for a in actions if a.topic is PLAN]
    assert isinstance(echo, Plan) and echo.epoch == 4
    again, more = apply(state, PlanSeen(echo, 200.0))
    assert more == () and again == state


@pytest.mark.parametrize(("epoch", "command"), [(5, True), (4, False)])
def test_a_plan_from_elsewhere_supersedes_the_rollout(epoch: int, command: bool) -> None:
    state, _ = run(start(3), request())
    state, actions = run(state, PlanSeen(plan(("car", 0, 4), epoch=epoch), 102.0))
    assert ("AbortEpoch" in kinds(actions)) is command
    (result,) = results(actions)
    assert result.outcome == "aborted" and "superseded" in result.reason
    assert state.committed_epoch == epoch and state.active is None
    state, actions = run(state, ready("car", 4), request(2, OTHER))
    assert [a.message.epoch for a in actions if isinstance(a.message, PrepareEpoch)] == [epoch + 1]


def test_recover_takes_the_highest_epoch_seen() -> None:
    state, actions = recover(CONFIG, None, None)
    assert (state.committed_epoch, state.highest_epoch, actions) == (0, 0, ())
    state, actions = recover(CONFIG, plan(("car", 0, 4), epoch=3), EpochLedger(highest_epoch=7))
    assert (state.committed_epoch, state.highest_epoch, actions) == (3, 7, ())
    state, _ = recover(CONFIG, plan(("car", 0, 4), epoch=8), EpochLedger(highest_epoch=7))
    assert state.highest_epoch == 8


def test_recover_aborts_a_rollout_left_in_progress() -> None:
    ledger = EpochLedger(highest_epoch=5, in_progress=5, decision_id=12, previous_epoch=3)
    state, actions = recover(CONFIG, plan(("car", 0, 4), epoch=3), ledger)
    assert kinds(list(actions)) == ["AbortEpoch", "EpochLedger", "RolloutFinished"]
    assert actions[0].message.epoch == 5  # type: ignore[attr-defined]
    assert actions[1].message == EpochLedger(highest_epoch=5)
    (result,) = results(list(actions))
    assert (result.decision_id, result.epoch, result.outcome) == (12, 5, "aborted")
    assert "restarted" in result.reason
    _, more = run(state, request())
    assert isinstance(more[1].message, PrepareEpoch) and more[1].message.epoch == 6


def test_recover_recommits_a_rollout_whose_plan_was_published() -> None:
    ledger = EpochLedger(highest_epoch=4, in_progress=4, decision_id=2, previous_epoch=3)
    state, actions = recover(CONFIG, plan(("car", 0, 4), epoch=4), ledger)
    assert kinds(list(actions)) == ["CommitEpoch", "EpochLedger", "RolloutFinished"]
    assert results(list(actions))[0].outcome == "committed" and state.committed_epoch == 4
    _, actions = recover(CONFIG, plan(("car", 0, 4), epoch=6), ledger)
    assert kinds(list(actions)) == ["EpochLedger", "RolloutFinished"]  # superseded: no command


def test_shutdown_aborts_the_active_and_refuses_the_queued() -> None:
    state, _ = run(start(3), request(1), request(2, OTHER))
    state, actions = shutdown(state, 103.0)
    assert kinds(list(actions)) == [
        "AbortEpoch",
        "EpochLedger",
        "RolloutFinished",
        "RolloutFinished",
    ]
    assert [(r.decision_id, r.epoch) for r in results(list(actions))] == [(1, 4), (2, 3)]
    assert state.active is None and state.queue == () and state.highest_epoch == 4
    assert shutdown(state, 104.0) == (state, ())


# --- properties ----------------------------------------------------------------------------

ACK = st.tuples(st.sampled_from([*NODES, "x"]), st.integers(3, 6), st.booleans())


@settings(max_examples=300, deadline=None)
@given(noise=st.lists(ACK, max_size=12), order=st.permutations(NODES), dup=st.integers(0, 2))
def test_any_interleaving_of_acks_commits_at_most_once(noise: Any, order: Any, dup: int) -> None:
    """READYs of every node in any order, mixed with duplicates and other epochs' acks:
    exactly one COMMIT unless a NACK of the epoch came first; then exactly one ABORT."""
    events: list[Event] = [ready(node, 4) for node in order]
    events += [ready(order[0], 4)] * dup
    for position, (node, epoch, ok) in enumerate(noise):
        ack = ready(node, epoch) if ok else rejected(node, epoch)
        events.insert(position % (len(events) + 1), ack)
    state, actions = run(start(3), request(), *events)
    names = kinds(actions)
    assert names.count("CommitEpoch") + names.count("AbortEpoch") == 1
    first_nack = next((i for i, e in enumerate(events) if isinstance(e, Acked)
                       and isinstance(e.ack, EpochRejected) and e.ack.epoch == 4 and e.ack.node in NODES), None)  # fmt: skip
    readies = [i for i, e in enumerate(events) if isinstance(e, Acked) and isinstance(e.ack, EpochReady)
               and e.ack.epoch == 4 and e.ack.node in NODES]  # fmt: skip
    all_ready_at = max(min(i for i in readies if events[i].ack.node == n) for n in NODES)  # type: ignore[union-attr]
    committed = first_nack is None or first_nack > all_ready_at
    assert ("CommitEpoch" in names) is committed
    assert state.committed_epoch == (4 if committed else 3) and state.active is None


EVENT = st.one_of(
    st.builds(lambda d, p: request(d, p), st.integers(0, 3), st.sampled_from([MOVED, OTHER])),
    st.builds(lambda n, e: ready(n, e), st.sampled_from(NODES), st.integers(1, 8)),
    st.builds(lambda n, e: rejected(n, e), st.sampled_from(NODES), st.integers(1, 8)),
    st.builds(lambda t: Deadline(t), st.sampled_from([0.0, 1e9])),
    st.builds(lambda e: PlanSeen(plan(("car", 0, 4), epoch=e), 0.0), st.integers(0, 8)),
    st.builds(lambda n: NodeLost(n, "offline", 0.0), st.sampled_from(NODES)),
    st.builds(lambda n: NodeBack(n), st.sampled_from(NODES)),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(EVENT, max_size=30))
def test_epochs_are_never_reused_and_the_machine_is_deterministic(events: list[Event]) -> None:
    state, actions = run(start(3), *events)
    prepared = [a.message.epoch for a in actions if isinstance(a.message, PrepareEpoch)]
    assert prepared == sorted(set(prepared)), prepared
    committed = [a.message.epoch for a in actions if isinstance(a.message, CommitEpoch)]
    assert set(committed) <= set(prepared) and committed == sorted(committed)
    for action in actions:
        if action.topic is PLAN:
            assert action.message.signature_ok(KEY)  # type: ignore[attr-defined]
        if isinstance(action.message, AbortEpoch):
            assert action.message.epoch not in committed
    assert state.highest_epoch >= max([state.committed_epoch, *prepared])
    assert run(start(3), *events) == (state, actions)
