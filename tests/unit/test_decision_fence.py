"""Replay fencing of decision records (shared/security/signing.py `decision_current`):
by (decision_id, revision), not by time, since the orchestrator republishes an older
decision's record (its rollout outcome, its realised effect) after newer decisions."""

from __future__ import annotations

from shared.messages import DecisionRecorded
from shared.messages.base import sign
from shared.security import signing
from shared.topics import DECISION_SLOTS

KEY = "unit-test-key-0123456789"
NOW = 1.8e9
"""Every record here is issued at NOW and every gate's clock reads NOW: the age bound
(`ControlGate.timely`, tests/unit/test_freshness.py) passes them all."""


def record(decision_id: int, revision: int, at_s: float = 0.0) -> DecisionRecorded:
    return sign(DecisionRecorded(decision_id=decision_id, revision=revision, at_s=at_s, trigger="node_down",
                                 action="keep", reason="no feasible plan", emergency=True,
                                 issued_at_s=NOW), KEY)  # fmt: skip


class ControlGate(signing.ControlGate):
    def __init__(self, key: str, owner: str) -> None:
        super().__init__(key, owner, clock=lambda: NOW)


def test_an_older_decisions_later_revision_is_accepted_and_its_earlier_one_refused() -> None:
    gate = ControlGate(KEY, "w1")
    assert gate.current(record(1, 1, at_s=10.0))  # decided: rollout pending
    assert gate.current(record(2, 1, at_s=20.0))  # a newer decision
    assert gate.current(record(1, 2, at_s=10.0))  # decision 1's outcome, after decision 2
    assert gate.current(record(1, 3, at_s=10.0))  # and its realised effect
    assert not gate.current(record(1, 2, at_s=10.0))  # an older revision again: a replay
    assert not gate.current(record(2, 1, at_s=20.0))  # the same revision live: a replay
    assert gate.refusals() == {"DecisionRecorded_replayed": 2}


def test_the_same_revision_retained_again_is_known_not_a_replay() -> None:
    """A resubscription after a reconnect delivers the slots' records again, retained."""
    gate = ControlGate(KEY, "w1")
    assert gate.current(record(4, 2))
    assert gate.current(record(4, 2), retained=True)
    assert not gate.current(record(4, 1), retained=True)  # an older revision sits in the slot
    assert gate.refusals() == {"DecisionRecorded_replayed": 1}


def test_retained_records_arrive_in_any_order() -> None:
    gate = ControlGate(KEY, "w1")
    ids = [17, 3, 9, 18, 5, 12, 4, 6, 7, 8, 10, 11, 13, 14, 15, 16]  # the 16 slots: decisions 3..18
    assert all(gate.current(record(i, 2), retained=True) for i in ids)
    assert gate.current(record(19, 1))  # the next decision
    assert gate.refusals() == {}


def test_a_decision_whose_slot_was_reused_is_refused() -> None:
    """Decision 1's slot holds decision 1 + DECISION_SLOTS: no genuine record of 1 comes
    any more, so even its newest revision, unseen here, is a replay."""
    gate = ControlGate(KEY, "w1")
    newest = 1 + DECISION_SLOTS
    assert gate.current(record(newest, 1))
    assert not gate.current(record(1, 9))
    assert not gate.current(record(1, 9), retained=True)
    assert gate.current(record(2, 1))  # 2 is still within the window of the slots
    assert gate.refusals() == {"DecisionRecorded_replayed": 2}


def test_a_restarted_orchestrator_continues_above_the_retained_ids() -> None:
    """It resumes at the highest retained id + 1 (records.restored) and starts each new
    decision at revision 1; a republication of a restored record bumps its revision."""
    gate = ControlGate(KEY, "w1")
    for i in range(5, 9):
        assert gate.current(record(i, 3), retained=True)
    assert gate.current(record(9, 1))
    assert gate.current(record(8, 4))
    assert gate.refusals() == {}


def test_the_fence_keeps_only_the_window() -> None:
    gate = ControlGate(KEY, "w1")
    for i in range(1, 1000):
        assert gate.current(record(i, 1))
    assert len(gate._decision_revisions) <= DECISION_SLOTS  # noqa: SLF001 - bounded memory
