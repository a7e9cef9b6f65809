"""Per-role Ed25519 signatures of control messages (shared/security/role_keys.py).

For every control kind: the role allowed to sign it passes the gate; every other role's
key is refused as ``{Kind}_role``; the cluster HMAC key (what every worker holds) and an
unknown Ed25519 key as ``{Kind}_forged``; no signature as ``{Kind}_unsigned``. Key
files: private keys 0600, only public keys in the folder receivers are given.
"""

from __future__ import annotations

import stat
from collections import Counter
from pathlib import Path

import pytest

from services.broadcaster.logic import BroadcastConfig, BroadcastState, Requested, apply
from services.cli import main
from shared.config import BusSettings
from shared.errors import ConfigError
from shared.messages import Message, PrepareEpoch, RolloutRequested
from shared.messages.base import sign
from shared.security.creds import init_state
from shared.security.role_keys import (
    SIGNER_OF,
    SIGNING_ROLES,
    ensure_role_keys,
    load_signer,
    load_verifier,
    private_key_file,
    public_key_file,
    role_verifier,
)
from shared.security.signing import ControlGate, require_signing_key
from tests.unit.test_control_signing import CONTROL, KEY, plan


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_role_keys(tmp_path_factory.mktemp("keys"))


@pytest.mark.parametrize("message", CONTROL, ids=lambda m: m.kind)
def test_only_the_kinds_own_role_may_sign_it(message: Message, keys: Path) -> None:
    gate = ControlGate(KEY, "test", verifier=load_verifier(keys / "public"))
    allowed = SIGNER_OF[message.kind]
    assert gate.accept(load_signer(private_key_file(keys, allowed)).sign(message))
    others = [role for role in SIGNING_ROLES if role != allowed]
    for role in others:  # a valid signature, of the wrong role
        assert not gate.accept(load_signer(private_key_file(keys, role)).sign(message))
    assert not gate.accept(sign(message, KEY))  # the cluster key every worker holds
    assert not gate.accept(message)
    signed = load_signer(private_key_file(keys, allowed)).sign(message)
    tampered = signed.model_copy(update={"signature": signed.signature[:-4] + "AAA="})  # type: ignore[attr-defined]
    assert not gate.accept(tampered)
    kind = message.kind
    assert gate.counters == Counter({f"{kind}_role": len(others), f"{kind}_forged": 2, f"{kind}_unsigned": 1})


def test_a_key_of_another_deployment_is_forged(keys: Path, tmp_path: Path) -> None:
    stranger = ensure_role_keys(tmp_path / "other")
    gate = ControlGate(KEY, "test", verifier=load_verifier(keys))
    forged = load_signer(private_key_file(stranger, "broadcaster")).sign(plan())
    assert not gate.accept(forged) and gate.counters == Counter({"Plan_forged": 1})


def test_a_signature_binds_every_field(keys: Path) -> None:
    gate = ControlGate(KEY, "test", verifier=load_verifier(keys))
    signed = load_signer(private_key_file(keys, "broadcaster")).sign(plan(epoch=4))
    assert gate.accept(signed, 4)
    assert not gate.accept(signed.model_copy(update={"entry_node": "rsu"}))


def test_the_broadcaster_signs_its_prepared_plan_with_its_role_key(keys: Path) -> None:
    signer = load_signer(private_key_file(keys, "broadcaster"))
    state = BroadcastState(BroadcastConfig(signing_key=KEY, plan_signer=signer.sign))
    orchestrator = load_signer(private_key_file(keys, "orchestrator"))
    _, actions = apply(state, Requested(orchestrator.sign(RolloutRequested(decision_id=1, plan=plan())), 0.0))
    prepare = next(a.message for a in actions if isinstance(getattr(a, "message", None), PrepareEpoch))
    gate = ControlGate(KEY, "worker", verifier=load_verifier(keys))
    assert gate.signed(prepare.plan) and prepare.plan.signature.startswith("ed25519:")


def test_key_files_and_folders(keys: Path) -> None:
    for role in SIGNING_ROLES:
        assert stat.S_IMODE(private_key_file(keys, role).stat().st_mode) == 0o600
        assert len(bytes.fromhex(public_key_file(keys, role).read_text().strip())) == 32
    assert stat.S_IMODE((keys / "private").stat().st_mode) == 0o700
    before = {role: private_key_file(keys, role).read_bytes() for role in SIGNING_ROLES}
    ensure_role_keys(keys)  # kept, never overwritten
    assert before == {role: private_key_file(keys, role).read_bytes() for role in SIGNING_ROLES}
    assert not list((keys / "public").glob("*.key"))  # receivers' folder: public keys only


def test_bad_key_files_are_config_errors(keys: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a signing role"):
        load_signer(tmp_path / "worker.key")
    (tmp_path / "monitor.key").write_text("not a key")
    with pytest.raises(ConfigError, match="unreadable"):
        load_signer(tmp_path / "monitor.key")
    with pytest.raises(ConfigError, match="public key of broadcaster"):
        load_verifier(tmp_path / "empty")
    settings = BusSettings(broker_url="mqtt://127.0.0.1:1", role_keys_dir=keys / "public")
    assert role_verifier(settings) is not None
    assert role_verifier(BusSettings(broker_url="mqtt://127.0.0.1:1")) is None


def test_monitor_and_orchestrator_need_only_their_role_key_on_the_secure_profile(keys: Path, tmp_path: Path) -> None:
    secure = "mqtts://127.0.0.1:8883"
    require_signing_key(BusSettings(broker_url=secure, role_key_file=private_key_file(keys, "monitor")), "monitor")
    with pytest.raises(ConfigError, match="refuses to start"):  # neither a role key nor the cluster key
        require_signing_key(BusSettings(broker_url=secure), "monitor")
    (tmp_path / "orchestrator.key").write_text("garbage")
    with pytest.raises(ConfigError, match="unreadable"):
        require_signing_key(BusSettings(broker_url=secure, role_key_file=tmp_path / "orchestrator.key"), "orchestrator")


def test_rotating_a_role_key_retires_the_old_pair_and_receivers_follow_on_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`creds rotate broadcaster`: a new pair, the old one kept under keys/retired. A
    receiver started with the old public keys refuses the new key's plans; one started
    (restarted) with the new public keys accepts them and refuses the old key's."""
    root = tmp_path / "state"
    init_state(root, None, cluster="rot")
    keys = root / "keys"
    old_signer, before = load_signer(private_key_file(keys, "broadcaster")), load_verifier(keys)
    old_public = public_key_file(keys, "broadcaster").read_text()
    assert main(["creds", "rotate", "broadcaster", "--state", str(root)]) == 0
    assert "restart every process" in capsys.readouterr().out
    retired = sorted((keys / "retired").iterdir())
    assert [path.suffix for path in retired] == [".key", ".pub"] and retired[1].read_text() == old_public
    assert stat.S_IMODE(retired[0].stat().st_mode) == 0o600 and stat.S_IMODE((keys / "retired").stat().st_mode) == 0o700
    assert public_key_file(keys, "broadcaster").read_text() != old_public
    new_signer, after = load_signer(private_key_file(keys, "broadcaster")), load_verifier(keys)
    old_plan, new_plan = old_signer.sign(plan(4)), new_signer.sign(plan(5))
    running = ControlGate(KEY, "not restarted", verifier=before)
    assert running.accept(old_plan) and not running.accept(new_plan)
    restarted = ControlGate(KEY, "restarted", verifier=after)
    assert restarted.accept(new_plan) and not restarted.accept(old_plan)
    assert restarted.counters == Counter({"Plan_forged": 1})
    # the other roles' keys are untouched
    assert load_signer(private_key_file(keys, "orchestrator")).role == "orchestrator"
    # a role that signs nothing, or a folder that is no state folder: one line, exit 2
    assert main(["creds", "rotate", "worker", "--state", str(root)]) == 2
    assert main(["creds", "rotate", "broadcaster", "--state", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err and "signing roles" in err
