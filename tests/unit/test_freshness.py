"""The freshness bound of the control kinds without an epoch (`ControlGate.timely`,
shared/security/signing.py): NodeDown, NodeJoined, EmulationCommand and DecisionRecorded
carry ``issued_at_s``, stamped and signed by the publishing bus, and a receiver refuses
one issued more than ``max_message_age_s`` ago as ``{Kind}_stale``. Unlike the per-receiver
memory (node event times, command ids, decision revisions), the bound survives a
receiver's restart. And an orchestrator without retained records never reuses a decision
id (`records.first_decision_id`)."""

from __future__ import annotations

from services.orchestrator.records import first_decision_id
from shared.messages import DecisionRecorded, EmulationCommand, Message, NodeDown, NodeJoined
from shared.messages.base import sign
from shared.security.signing import ControlGate

KEY = "unit-test-key-0123456789"
NOW = 1.8e9
AGE_S = 30.0


def gate(now_s: float = NOW) -> ControlGate:
    return ControlGate(KEY, "w1", max_age_s=AGE_S, clock=lambda: now_s)


def down(issued_at_s: float, at_s: float | None = None) -> NodeDown:
    event = NodeDown(node="rsu", at_s=at_s if at_s is not None else issued_at_s, reason="offline",  # type: ignore[arg-type]
                     issued_at_s=issued_at_s)  # fmt: skip
    return sign(event, KEY)


def record(decision_id: int, revision: int, issued_at_s: float, at_s: float = NOW - 600) -> DecisionRecorded:
    return sign(DecisionRecorded(decision_id=decision_id, revision=revision, trigger="node_down", action="migrate",
                                 at_s=at_s, issued_at_s=issued_at_s), KEY)  # fmt: skip


def test_a_message_issued_longer_ago_than_the_bound_is_stale_whatever_the_receiver_remembers() -> None:
    """A receiver started after the event (nothing to compare with) still refuses its
    replay; one within the bound passes."""
    fresh_gate = gate()
    old: list[Message] = [down(NOW - AGE_S - 1), sign(NodeJoined(node="rsu", at_s=NOW - 40, reason="status",  # type: ignore[arg-type]
                                                                  issued_at_s=NOW - 40), KEY),
                          sign(EmulationCommand(command_id=7, slowdown=50.0, issued_at_s=NOW - 31), KEY),
                          record(3, 1, NOW - 31)]  # fmt: skip
    assert not any(fresh_gate.current(message) for message in old)
    assert fresh_gate.refusals() == {"NodeDown_stale": 1, "NodeJoined_stale": 1, "EmulationCommand_stale": 1,
                                     "DecisionRecorded_stale": 1}  # fmt: skip
    assert fresh_gate.current(down(NOW - AGE_S))  # just within the bound
    assert fresh_gate.current(sign(EmulationCommand(command_id=8, slowdown=2.0, issued_at_s=NOW - 1), KEY))
    assert fresh_gate.current(record(4, 1, NOW))
    assert sum(fresh_gate.refusals().values()) == 4


def test_an_unstamped_message_is_stale() -> None:
    """``issued_at_s`` 0 (signed by something other than a bus, or before the field
    existed): refused, not taken as 'no time given'."""
    assert not gate().current(sign(EmulationCommand(command_id=1, slowdown=2.0), KEY))


def test_a_message_issued_far_in_the_future_is_refused() -> None:
    """A signer whose clock runs ahead would otherwise make its messages replayable for
    longer: beyond the bound either way is refused (and shows the clock problem)."""
    receiver = gate()
    assert receiver.current(down(NOW + AGE_S - 1))
    assert not receiver.current(down(NOW + AGE_S + 5))
    assert receiver.refusals() == {"NodeDown_stale": 1}


def test_the_bound_comes_before_the_per_node_fence() -> None:
    """A stale event does not move the node's newest time: a later genuine one passes."""
    receiver = gate()
    assert not receiver.current(down(NOW - 100, at_s=NOW + 5))
    assert receiver.current(down(NOW - 1))
    assert receiver.refusals() == {"NodeDown_stale": 1}


def test_a_republished_older_decision_passes_because_each_publication_is_stamped() -> None:
    """The orchestrator republishes decision 1 (decided 10 minutes ago: ``at_s``) with its
    realised effect after decision 2; the republication's ``issued_at_s`` is now, so it
    passes. Its first revision, replayed now, is stale."""
    receiver = gate(NOW - 600)
    assert receiver.current(record(1, 1, NOW - 600))
    receiver.clock = lambda: NOW
    assert receiver.current(record(2, 1, NOW - 2, at_s=NOW - 2))
    assert receiver.current(record(1, 2, NOW - 1))  # the outcome / realised effect, after decision 2
    assert not receiver.current(record(1, 1, NOW - 600))  # the first revision again, ten minutes on
    assert receiver.refusals() == {"DecisionRecorded_stale": 1}


def test_a_retained_record_is_read_as_state_without_the_bound() -> None:
    """Retained records (the 16 slots a subscriber reads on start or after a reconnect) are
    older than the bound by design; they are fenced by (decision_id, revision) only, as
    before: a worker acts on no retained record."""
    receiver = gate()
    assert receiver.current(record(5, 3, NOW - 3600), retained=True)
    assert receiver.current(record(5, 3, NOW - 3600), retained=True)  # a resubscription: known
    assert not receiver.current(record(5, 2, NOW - 3600), retained=True)  # an older revision
    assert not receiver.current(record(5, 3, NOW - 3600))  # the same record live: stale
    assert receiver.refusals() == {"DecisionRecorded_replayed": 1, "DecisionRecorded_stale": 1}


def test_a_restarted_orchestrators_first_id_is_above_every_id_an_earlier_one_issued() -> None:
    """An orchestrator started at t0 and deciding once per second for a day, then
    restarted without its records a second later: the new first id is above all the old
    ones, so a receiver that saw them accepts the new records."""
    t0 = NOW - 86_401
    earlier = [first_decision_id(t0) + n for n in range(86_400)]
    first = first_decision_id(NOW)
    assert first > max(earlier)
    receiver = gate()
    for decision_id in earlier[-16:]:
        assert receiver.current(record(decision_id, 1, NOW - 2))
    assert receiver.current(record(first, 1, NOW))
    assert receiver.refusals() == {}
    assert first_decision_id(0.0) == 1  # never 0: a clock at the epoch still starts at 1
