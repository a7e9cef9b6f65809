"""Signed, epoch-fenced control messages and trust from identity (issue #17, items 2-3):
shared/security/signing.py, shared/security/trust.py, services/broadcaster/checks.py.

Per control kind: a correctly signed message passes the receiver's gate; a forged one
(another key), an unsigned one, a tampered one (changed after signing) and, for plans
and epoch commands, a replay of an epoch below the committed one are refused and
counted under ``{Kind}_{why}``."""

from __future__ import annotations

import logging
import stat
from collections import Counter
from pathlib import Path

import pytest

from services.broadcaster.checks import MAX_EPOCH_GAP, ledger_problem, private_problem
from services.broadcaster.logic import BroadcastConfig, BroadcastState, Requested, apply
from services.worker.guard import PrivacyGuard
from services.worker.settings import WorkerSettings
from shared.config import BusSettings
from shared.errors import ConfigError
from shared.messages import (
    AbortEpoch,
    CapacityProfile,
    CommitEpoch,
    DecisionRecorded,
    EmulationCommand,
    EpochLedger,
    Message,
    NodeCapacity,
    NodeDown,
    NodeJoined,
    Plan,
    PrepareEpoch,
    PrivacyPolicy,
    PrivacyPolicySet,
    RolloutFinished,
    RolloutRequested,
    Segment,
)
from shared.messages.base import is_signed_kind, sign, signature_ok
from shared.security import signing
from shared.security.creds import init_state
from shared.security.signing import (
    DEV_SIGNING_KEY,
    ControlGate,
    configured_key,
    control_key,
    ensure_key_file,
    require_control_key,
)
from shared.security.trust import TrustRegistry, load_trust
from shared.topology import Topology

KEY = "cluster-key-0123456789abcdef"
OTHER_KEY = "attacker-key-0123456789abcdef"


def plan(epoch: int = 3, entry: str = "car", *segments: tuple[str, int, int]) -> Plan:
    chosen = segments or (("car", 0, 2), ("rsu", 2, 4))
    return Plan(epoch=epoch, model_id="m", entry_node=entry,  # type: ignore[arg-type]
                segments=tuple(Segment(node=n, start=s, end=e) for n, s, e in chosen))  # type: ignore[arg-type]  # fmt: skip


CONTROL: list[Message] = [
    plan(),
    PrepareEpoch(epoch=3, plan=plan().sign(KEY)),
    CommitEpoch(epoch=3),
    AbortEpoch(epoch=3, reason="x"),
    EpochLedger(highest_epoch=3),
    RolloutRequested(decision_id=1, plan=plan()),
    PrivacyPolicySet(policy=PrivacyPolicy(trusted_level=2, private_blocks=1), set_at_s=10.0),
    EmulationCommand(command_id=1, slowdown=2.0),
    DecisionRecorded(decision_id=1, trigger="t", action="keep"),
    NodeDown(node="rsu", at_s=1.0, reason="offline"),  # type: ignore[arg-type]
    NodeJoined(node="rsu", at_s=1.0, reason="status"),  # type: ignore[arg-type]
]
"""One message of every kind that changes the cluster."""


@pytest.mark.parametrize("message", CONTROL, ids=lambda m: m.kind)
def test_each_control_kind_is_signed_and_checked(message: Message) -> None:
    assert is_signed_kind(message)
    gate = ControlGate(KEY, "test")
    signed = sign(message, KEY)
    assert signature_ok(signed, KEY) and gate.accept(signed)
    assert not gate.accept(message)  # unsigned
    assert not gate.accept(sign(message, OTHER_KEY))  # forged: another key
    first_field = next(name for name in type(message).model_fields if name not in ("signature",))
    value = getattr(signed, first_field)
    changed = value + 1 if isinstance(value, int) else value
    if changed != value:  # tampered after signing
        assert not gate.accept(signed.model_copy(update={first_field: changed}))
    forged = 2 if changed != value else 1
    assert gate.counters == Counter({f"{message.kind}_unsigned": 1, f"{message.kind}_forged": forged})
    assert gate.refusals() == dict(gate.counters)


def test_a_signature_binds_the_kind() -> None:
    """CommitEpoch and AbortEpoch of one epoch: the signature of one is not the other's."""
    commit = sign(CommitEpoch(epoch=5), KEY)
    abort = AbortEpoch(epoch=5, reason="", signature=commit.signature)
    assert not signature_ok(abort, KEY)


def test_epoch_fencing_refuses_replays_below_the_committed_epoch() -> None:
    gate = ControlGate(KEY, "w1")
    gate.committed(7)
    old = sign(plan(epoch=6), KEY)
    assert not gate.accept(old, old.epoch)
    assert not gate.accept(sign(AbortEpoch(epoch=5, reason="old"), KEY), 5)
    assert gate.accept(sign(CommitEpoch(epoch=7), KEY), 7)  # the committed one again: harmless
    assert gate.accept(sign(plan(epoch=8), KEY), 8)
    assert gate.refusals() == {"Plan_replayed": 1, "AbortEpoch_replayed": 1}
    assert not gate.accept(plan(epoch=9), 9)  # unsigned, whatever the epoch
    assert gate.refusals()["Plan_unsigned"] == 1


def test_a_node_event_older_than_the_newest_for_its_node_is_a_replay() -> None:
    """An old, genuinely signed NodeDown sent again after the node came back must not fail
    its passes: node events are fenced by their time, per node (all issued within the
    age bound here: tests/unit/test_freshness.py has the bound)."""
    gate = ControlGate(KEY, "w1", clock=lambda: 140.0)
    down = sign(NodeDown(node="rsu", at_s=100.0, reason="heartbeat_timeout", issued_at_s=130.0), KEY)  # type: ignore[arg-type]
    back = sign(NodeJoined(node="rsu", at_s=130.0, reason="status", issued_at_s=131.0), KEY)  # type: ignore[arg-type]
    assert gate.signed(down) and gate.current(down)
    assert gate.current(down)  # the same event again (a redelivery): already known
    assert gate.current(back)
    assert not gate.current(down)  # replayed after the node came back
    other = sign(NodeDown(node="car", at_s=50.0, reason="heartbeat_timeout", issued_at_s=139.0), KEY)  # type: ignore[arg-type]
    assert gate.current(other)  # another node's history is its own
    assert gate.current(sign(plan(epoch=1), KEY))  # kinds with an epoch are fenced by it instead
    assert gate.refusals() == {"NodeDown_replayed": 1}


def test_unsigned_kinds_pass_the_gate() -> None:
    gate = ControlGate(KEY, "w1")
    finished = RolloutFinished(decision_id=1, epoch=1, previous_epoch=0, outcome="committed")
    assert not is_signed_kind(finished) and gate.accept(finished)


def test_no_default_key(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    secure = BusSettings(broker_url="mqtts://127.0.0.1:8883")
    assert control_key(secure) is None
    with pytest.raises(ConfigError, match="worker refuses to start: the secure profile"):
        require_control_key(secure, "worker")
    monkeypatch.setattr(signing, "_warned_dev_key", False)
    with caplog.at_level(logging.WARNING):
        assert control_key(BusSettings()) == DEV_SIGNING_KEY
        assert control_key(BusSettings()) == DEV_SIGNING_KEY
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "PUBLIC development key" in caplog.records[0].message
    key_file = ensure_key_file(tmp_path / "state")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert ensure_key_file(tmp_path / "state") == key_file  # reused, not replaced
    key = key_file.read_text().strip()
    assert len(key) == 64
    given = BusSettings(broker_url="mqtts://127.0.0.1:8883", plan_signing_key_file=key_file)
    assert require_control_key(given, "worker") == key
    with pytest.raises(ConfigError, match="shorter than 16"):
        configured_key(BusSettings(plan_signing_key="short"))
    with pytest.raises(ConfigError, match="unreadable"):
        configured_key(BusSettings(plan_signing_key_file=tmp_path / "missing"))


def test_a_published_policy_is_checked_and_fenced_by_its_time() -> None:
    guard = PrivacyGuard(WorkerSettings(node_id="mec", shards_dir=Path("."), trust=0))  # type: ignore[arg-type]
    guard.gate = ControlGate(KEY, "mec")
    tight = PrivacyPolicySet(policy=PrivacyPolicy(trusted_level=2, private_blocks=3), set_at_s=20.0)
    loose = PrivacyPolicySet(policy=PrivacyPolicy(), set_at_s=10.0)
    assert not guard.accepts(sign(tight, OTHER_KEY))
    assert guard.accepts(sign(tight, KEY))
    assert not guard.accepts(sign(loose, KEY))  # an older policy replayed
    assert guard.gate.refusals() == {"PrivacyPolicySet_forged": 1, "PrivacyPolicySet_replayed": 1}


# --- trust from identity ------------------------------------------------------------------


def test_trust_comes_from_the_registry_not_from_the_node(tmp_path: Path) -> None:
    topology = Topology.model_validate({"name": "t", "nodes": [
        {"id": "car", "trust": 2, "memory_bytes": 1e9, "entry": True},
        {"id": "mec", "trust": 0, "memory_bytes": 1e9}]})  # fmt: skip
    init_state(tmp_path / "state", topology, cluster="site")
    registry = load_trust(tmp_path / "state" / "identities.toml")
    assert registry is not None and registry.trust == {"car": 2, "mec": 0}
    assert load_trust(None) is None
    claimed = CapacityProfile(as_of_s=1.0, nodes=(
        NodeCapacity(node="mec", alive=True, trust=10, memory_free_bytes=1, flops_per_s=1.0, utilisation=0.0),  # type: ignore[arg-type]
        NodeCapacity(node="ghost", alive=True, trust=10, memory_free_bytes=1, flops_per_s=1.0, utilisation=0.0),  # type: ignore[arg-type]
    ))  # fmt: skip
    assert [n.trust for n in registry.apply(claimed).nodes] == [0, 0]  # claims ignored; unknown: 0


# --- the broadcaster is no signing oracle --------------------------------------------------


def test_a_ledger_bomb_is_not_believed() -> None:
    assert ledger_problem(EpochLedger(highest_epoch=12), committed_epoch=10) is None
    assert ledger_problem(EpochLedger(highest_epoch=10 + MAX_EPOCH_GAP), 10) is None
    bomb = EpochLedger(highest_epoch=2**63 - 1)
    problem = ledger_problem(bomb, 10)
    assert problem is not None and "ahead of the committed epoch 10" in problem


def test_a_rollout_breaking_the_policy_is_refused_before_it_is_signed() -> None:
    trust = TrustRegistry({"car": 2, "rsu": 1, "mec": 0})
    policy = PrivacyPolicy(trusted_level=2, private_blocks=1)
    fine = plan(0, "car", ("car", 0, 2), ("mec", 2, 4))
    assert private_problem(fine, 4, policy, trust) is None
    on_mec = plan(0, "car", ("mec", 0, 2), ("car", 2, 4))
    problem = private_problem(on_mec, 4, policy, trust)
    assert problem is not None and problem.startswith("private: mec (trust 0)")
    mec_entry = plan(0, "mec", ("car", 0, 4))
    assert "entry mec" in (private_problem(mec_entry, 4, policy, trust) or "")
    assert private_problem(on_mec, 4, policy, None) is None  # no registry: the workers judge
    state = BroadcastState(BroadcastConfig(signing_key=KEY, num_layers=4))
    request = RolloutRequested(decision_id=4, plan=on_mec)
    state, actions = apply(state, Requested(request, 1.0, refusal=problem))
    assert [a.message.kind for a in actions] == ["RolloutFinished"]  # no PREPARE, no epoch
    finished = actions[0].message
    assert isinstance(finished, RolloutFinished) and finished.outcome == "aborted"
    assert state.highest_epoch == 0 and state.active is None


@pytest.mark.parametrize("service", ["broadcaster", "orchestrator", "monitor", "worker"])
def test_a_service_on_the_secure_profile_without_a_key_refuses_to_start(
    service: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    for name in ("EDGESPLIT_PLAN_SIGNING_KEY", "EDGESPLIT_PLAN_SIGNING_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    args = {"broadcaster": [], "monitor": [], "orchestrator": ["--shards", str(tmp_path)],
            "worker": ["--node-id", "car", "--shards", str(tmp_path)]}[service]  # fmt: skip
    main = importlib.import_module(f"services.{service}.__main__").main
    code = main([*args, "--broker", "mqtts://127.0.0.1:8883"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "refuses to start: the secure profile" in err[0] and "EDGESPLIT_PLAN_SIGNING_KEY_FILE" in err[0]


def test_an_unreadable_registry_is_one_line_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.broadcaster.__main__ import main

    monkeypatch.setenv("EDGESPLIT_PLAN_SIGNING_KEY", KEY)
    code = main(["--identities", str(tmp_path / "missing.toml"), "--broker", "mqtt://127.0.0.1:1"])
    err = [line for line in capsys.readouterr().err.splitlines() if "identity registry" in line]
    assert code != 0 and len(err) == 1 and "missing.toml" in err[0], err


def test_the_open_profile_finds_the_key_up_keeps_for_its_broker_and_cluster(tmp_path: Path) -> None:
    """`edgesplit emulate` in another terminal signs with the running stack's key: `up`
    keeps it per broker and cluster under the cache folder; the secure profile never
    looks there, and another broker or cluster has no key."""
    from shared.config import BusSettings
    from shared.security.signing import configured_key, ensure_key_file, local_key_file

    def settings(url: str, cluster: str = "default") -> BusSettings:
        return BusSettings(broker_url=url, cluster=cluster, models_dir=tmp_path / "models")

    mine = settings("mqtt://127.0.0.1:1883")
    assert configured_key(mine) is None
    local = local_key_file(mine)
    ensure_key_file(local.parent, local.name)
    assert configured_key(mine) == local.read_text().strip() and len(local.read_text().strip()) == 64
    assert local.stat().st_mode & 0o777 == 0o600
    assert configured_key(settings("mqtt://127.0.0.1:1884")) is None
    assert configured_key(settings("mqtt://127.0.0.1:1883", "other")) is None
