"""A receiver's memory of what it accepted, across its restarts
(shared/security/replay_memory.py, `ControlGate.memory`).

Without it, a receiver restarted within ``max_message_age_s`` of a NodeDown, an emulation
command or a live decision record accepts a recorded copy of it once (docs/SECURITY.md,
"Freshness"). With a memory file the restarted receiver refuses exactly what its earlier
run accepted, as ``{Kind}_replayed``; a new genuine message, and within one run a QoS 1
redelivery, pass as before; entries past the bound are dropped."""

from __future__ import annotations

import json
from pathlib import Path

from shared.config import BusSettings
from shared.messages import DecisionRecorded, EmulationCommand, NodeDown, NodeStatus
from shared.messages.base import sign
from shared.security.replay_memory import SLACK_S, ReplayMemory, memory_file
from shared.security.signing import START_MARGIN_S, ControlGate, receiver_fences

KEY = "unit-test-key-0123456789"
NOW = 1.8e9
AGE_S = 30.0


def gate(path: Path, now_s: float = NOW) -> ControlGate:
    receiver = ControlGate(KEY, "w1", max_age_s=AGE_S, clock=lambda: now_s)
    receiver.memory = ReplayMemory(path, AGE_S, clock=lambda: now_s)
    return receiver


def messages(issued_at_s: float) -> list[NodeDown | EmulationCommand | DecisionRecorded]:
    return [sign(NodeDown(node="rsu", at_s=issued_at_s, reason="offline", issued_at_s=issued_at_s), KEY),  # type: ignore[arg-type]
            sign(EmulationCommand(command_id=5, slowdown=3.0, issued_at_s=issued_at_s), KEY),
            sign(DecisionRecorded(decision_id=9, revision=1, trigger="node_down", action="migrate",
                                  at_s=issued_at_s, issued_at_s=issued_at_s), KEY)]  # fmt: skip


def test_a_restarted_receiver_refuses_what_it_accepted_before_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "replay" / "c-w1.json"
    first = gate(path)
    accepted = messages(NOW - 5)
    assert all(first.current(message) for message in accepted)
    assert first.current(accepted[1])  # a QoS 1 redelivery within the run: its own fences decide
    assert path.stat().st_mode & 0o777 == 0o600
    restarted = gate(path, NOW + 10)  # 15 s after the messages: within the bound
    assert not any(restarted.current(message) for message in accepted)
    assert restarted.refusals() == {"NodeDown_replayed": 1, "EmulationCommand_replayed": 1,
                                    "DecisionRecorded_replayed": 1}  # fmt: skip
    assert all(restarted.current(message) for message in messages(NOW + 9))  # new publications pass
    status = NodeStatus(node="rsu", state="online", trust=0, memory_bytes=1, threads=1)  # type: ignore[arg-type]
    assert restarted.current(status) and restarted.current(status)  # kinds without issue time: untouched


def test_without_a_memory_the_restarted_receiver_accepts_the_replay_once(tmp_path: Path) -> None:
    """What the memory closes: the same sequence without it (today's bound alone)."""
    first = ControlGate(KEY, "w1", max_age_s=AGE_S, clock=lambda: NOW)
    accepted = messages(NOW - 5)
    assert all(first.current(message) for message in accepted)
    restarted = ControlGate(KEY, "w1", max_age_s=AGE_S, clock=lambda: NOW + 10)
    assert all(restarted.current(message) for message in accepted) and restarted.refusals() == {}


def test_entries_past_the_bound_are_dropped_and_a_broken_file_is_no_memory(tmp_path: Path) -> None:
    path = tmp_path / "c-w1.json"
    first = gate(path)
    old, recent = messages(NOW - 20)[0], messages(NOW - 1)[1]
    assert first.current(old) and first.current(recent)
    later = NOW + AGE_S + SLACK_S - 10  # old is past the bound and slack, recent is not
    assert len(ReplayMemory(path, AGE_S, clock=lambda: later).previous) == 1
    assert len(json.loads(path.read_text())) == 2
    path.write_text("{not json")
    assert ReplayMemory(path, AGE_S).previous == frozenset()


def test_settings_give_one_file_per_cluster_and_owner(tmp_path: Path) -> None:
    settings = BusSettings(cluster="c7", replay_memory_dir=tmp_path)  # type: ignore[arg-type]
    receiver = receiver_fences(ControlGate(KEY, "rsu"), settings)
    assert receiver.memory is not None and receiver.memory.path == memory_file(tmp_path, "c7", "rsu")
    assert receiver_fences(ControlGate(KEY, "rsu"), BusSettings()).memory is None


def test_a_receiver_refuses_live_messages_issued_before_it_started() -> None:
    """No genuine non-retained message issued before a receiver subscribed can reach it
    (clean session): one issued more than START_MARGIN_S before its start is a replay,
    even well within the freshness bound. Retained decision records are state, not
    fenced so; kinds without an issue time pass."""
    clock = [NOW]
    receiver = receiver_fences(ControlGate(KEY, "client", max_age_s=AGE_S, clock=lambda: clock[0]), None)
    clock[0] = NOW + 1.0
    before, skewed, after = messages(NOW - 5), messages(NOW - START_MARGIN_S + 0.5), messages(NOW + 0.5)
    assert not any(receiver.current(message) for message in before)
    assert receiver.refusals() == {"NodeDown_replayed": 1, "EmulationCommand_replayed": 1,
                                   "DecisionRecorded_replayed": 1}  # fmt: skip
    assert receiver.current(skewed[0])  # a publisher's clock a little behind: still genuine
    assert receiver.current(after[1]) and receiver.current(after[2])
    assert receiver.current(before[2], retained=True)  # retained state: fenced by ids only
    assert receiver.memory is None  # no settings: no memory file
