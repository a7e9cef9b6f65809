"""ACL generation from the topic registry (shared/security/acl.py) and the state folder
(shared/security/creds.py). The expectations here are written from issue #17 and
docs/ARCHITECTURE.md, not from acl.GRANTS; tests/integration/test_secure_broker.py checks
that Mosquitto enforces the generated file."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from shared.config import BusSettings, load_settings
from shared.errors import ConfigError, InvalidId
from shared.security.acl import GRANTS, Identity, Role, render_acl, rules_for
from shared.security.creds import (
    StateDir,
    add_identity,
    hash_password,
    init_state,
    load_registry,
)
from shared.topics import REGISTRY
from shared.topology import DEFAULT_TOPOLOGY, load_topology

CLUSTER = "site1"
NAMES = {Role.WORKER: "w1", Role.BROADCASTER: "broadcaster", Role.ORCHESTRATOR: "orchestrator",
         Role.SPLIT_REVISER: "split-reviser", Role.MONITOR: "monitor", Role.OPERATOR: "operator",
         Role.CLIENT: "c1", Role.GATEWAY: "gateway"}  # fmt: skip

# Who may publish each topic (issue #17 item 1 and the ARCHITECTURE table). "own": only on
# the instance named after the publisher.
PUBLISHERS: dict[str, dict[Role, str]] = {
    "nodes/{node}/status": {Role.WORKER: "own"},
    "nodes/{node}/telemetry": {Role.WORKER: "own"},
    "epoch/acks/{node}": {Role.WORKER: "own"},
    "nodes/{node}/emulation_state": {Role.WORKER: "own"},
    "nodes/{node}/activations": {Role.WORKER: "any"},
    "clients/{client}/replies": {Role.WORKER: "any"},
    "requests/finished": {Role.WORKER: "any"},
    "plan/current": {Role.BROADCASTER: "any"},
    "epoch/commands": {Role.BROADCASTER: "any"},
    "broadcaster/ledger": {Role.BROADCASTER: "any"},
    "broadcaster/results": {Role.BROADCASTER: "any"},
    "orchestrator/decisions/{slot}": {Role.ORCHESTRATOR: "any"},
    "broadcaster/rollouts": {Role.ORCHESTRATOR: "any"},
    "reviser/requests": {Role.ORCHESTRATOR: "any"},
    "reviser/replies/{client}": {Role.SPLIT_REVISER: "any"},
    "monitor/capacity": {Role.MONITOR: "any"},
    "monitor/events": {Role.MONITOR: "any"},
    "policy/privacy": {Role.OPERATOR: "any"},
    "nodes/{node}/emulation": {Role.OPERATOR: "any"},
    "nodes/{node}/requests": {Role.CLIENT: "any", Role.GATEWAY: "any"},
    "services/{service}/status": {Role.BROADCASTER: "own", Role.ORCHESTRATOR: "own", Role.MONITOR: "own",
                                  Role.SPLIT_REVISER: "own"},
}


def may(role: Role, access: str, topic: str, name: str | None = None) -> bool:
    """Does the rendered rule set of ``role`` allow ``access`` ("read"/"write") on ``topic``?"""
    identity = Identity(name or NAMES[role], role)
    return any(access in rule.access and topic_matches_sub(rule.filter, topic)
               for rule in rules_for(identity, CLUSTER))  # fmt: skip


def concrete(pattern: str, value: str) -> str:
    topic = REGISTRY[pattern]
    return topic.topic(CLUSTER, **dict.fromkeys(topic.params, value))


def test_every_registry_topic_has_exactly_the_publishers_the_issue_names() -> None:
    assert set(PUBLISHERS) == set(REGISTRY), "classify every new topic here and in acl.GRANTS"
    for pattern, publishers in PUBLISHERS.items():
        for role in Role:
            own, other = concrete(pattern, NAMES[role]), concrete(pattern, "someone-else")
            scope = publishers.get(role)
            assert may(role, "write", own) == (scope is not None), (pattern, role)
            assert may(role, "write", other) == (scope == "any"), (pattern, role)


def test_every_topic_is_read_by_someone_and_the_operator_reads_everything() -> None:
    for pattern in REGISTRY:
        readers = {role for role in Role if may(role, "read", concrete(pattern, NAMES[role]))}
        assert readers - {Role.OPERATOR}, f"nobody but the operator reads {pattern}"
        assert may(Role.OPERATOR, "read", concrete(pattern, "anyone"))


def test_a_worker_reads_only_its_own_requests_inputs_and_emulation() -> None:
    for pattern in ("nodes/{node}/requests", "nodes/{node}/activations", "nodes/{node}/emulation"):
        assert may(Role.WORKER, "read", concrete(pattern, "w1"))
        assert not may(Role.WORKER, "read", concrete(pattern, "w2"))
    for pattern in ("plan/current", "epoch/commands", "policy/privacy", "nodes/{node}/status",
                    "monitor/events", "orchestrator/decisions/{slot}"):  # fmt: skip
        assert may(Role.WORKER, "read", concrete(pattern, "w2")), pattern
    for pattern in ("clients/{client}/replies", "requests/finished", "broadcaster/rollouts",
                    "reviser/requests", "monitor/capacity", "nodes/{node}/telemetry"):  # fmt: skip
        assert not may(Role.WORKER, "read", concrete(pattern, "w1")), pattern


def test_a_client_reads_only_its_own_replies_and_no_prompts() -> None:
    assert may(Role.CLIENT, "read", concrete("clients/{client}/replies", "c1"))
    assert not may(Role.CLIENT, "read", concrete("clients/{client}/replies", "c2"))
    assert not may(Role.CLIENT, "read", concrete("nodes/{node}/requests", "car"))
    assert not may(Role.CLIENT, "read", concrete("requests/finished", "-"))
    assert not may(Role.CLIENT, "read", concrete("nodes/{node}/activations", "car"))


def test_the_gateway_reads_its_own_replies_and_the_dashboard_state_and_no_prompts() -> None:
    assert may(Role.GATEWAY, "read", concrete("clients/{client}/replies", "gateway"))
    assert not may(Role.GATEWAY, "read", concrete("clients/{client}/replies", "c1"))
    for pattern in ("plan/current", "monitor/capacity", "orchestrator/decisions/{slot}"):
        assert may(Role.GATEWAY, "read", concrete(pattern, "x")), pattern
    for pattern in ("nodes/{node}/requests", "requests/finished", "nodes/{node}/activations",
                    "policy/privacy", "broadcaster/rollouts"):  # fmt: skip
        assert not may(Role.GATEWAY, "read", concrete(pattern, "car")), pattern


def test_the_orchestrator_reads_only_its_own_reviser_replies() -> None:
    assert may(Role.ORCHESTRATOR, "read", concrete("reviser/replies/{client}", "orchestrator"))
    assert not may(Role.ORCHESTRATOR, "read", concrete("reviser/replies/{client}", "x"))


def test_rules_are_bound_to_one_cluster_and_written_as_user_blocks() -> None:
    text = render_acl([Identity("w1", Role.WORKER, 2), Identity("c1", Role.CLIENT)], CLUSTER)
    assert "pattern " not in text  # pattern lines would apply to every user
    assert "user w1\n" in text and "user c1\n" in text
    filters = [line.split()[2] for line in text.splitlines() if line.startswith("topic ")]
    assert filters and all(f.startswith(f"edgesplit/{CLUSTER}/") for f in filters)
    assert "#" not in "".join(filters)  # only the operator reads everything
    assert not any(topic_matches_sub(f, "edgesplit/other/nodes/w1/requests") for f in filters)


def test_bad_identities_and_clusters_are_refused() -> None:
    with pytest.raises(InvalidId):
        Identity("w1/x", Role.WORKER)  # '/' would let w1/x write into w1's topics (facts.md)
    with pytest.raises(InvalidId):
        Identity("w+", Role.WORKER)
    with pytest.raises(ConfigError, match="trust"):
        Identity("w1", Role.WORKER, trust=11)
    with pytest.raises(ConfigError, match="twice"):
        render_acl([Identity("w1", Role.WORKER), Identity("w1", Role.CLIENT)], CLUSTER)
    with pytest.raises(InvalidId):
        render_acl([], "a/b")


def test_every_role_has_grants() -> None:
    assert set(GRANTS) == set(Role)


# --- creds --------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_password_hash_is_the_one_mosquitto_passwd_writes(tmp_path: Path) -> None:
    import base64

    passwords = tmp_path / "passwords"
    passwords.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "u", "s3cret"], check=True)
    line = passwords.read_text().strip()
    user, hashed = line.split(":", 1)
    _, seven, iterations, salt, _ = hashed.split("$")
    assert (user, seven, iterations) == ("u", "7", "101")
    assert hash_password("s3cret", base64.b64decode(salt)) == hashed
    assert hash_password("s3cret", base64.b64decode(salt)) != hash_password("other", base64.b64decode(salt))


def test_init_creates_the_layout_with_private_keys(tmp_path: Path) -> None:
    root = tmp_path / "state"
    registry = init_state(root, load_topology(DEFAULT_TOPOLOGY), cluster=CLUSTER)
    state = StateDir(root)
    workers = {i.name: i.trust for i in registry.of_role(Role.WORKER)}
    assert workers == {"car": 2, "rsu": 1, "mec": 0}  # trust from the topology
    assert load_registry(state) == registry
    for identity in registry.identities:
        credentials = state.credentials(identity.name)
        assert credentials.cert_file.is_file()
        for private in (credentials.key_file, credentials.password_file):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
        assert f"user {identity.name}\n" in state.acl.read_text()
        assert any(line.startswith(f"{identity.name}:$7$") for line in state.passwords.read_text().splitlines())
    assert stat.S_IMODE(state.ca.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.passwords.stat().st_mode) == 0o600
    config = state.broker_config.read_text()
    assert "allow_anonymous false" in config and "require_certificate true" in config
    assert "use_identity_as_username true" in config and str(state.acl) in config


def test_init_refuses_an_initialised_folder_and_add_refuses_existing_names(tmp_path: Path) -> None:
    root = tmp_path / "state"
    init_state(root, None, cluster=CLUSTER)
    before = (root / "identities.toml").read_text()
    with pytest.raises(ConfigError, match="already initialised"):
        init_state(root, None, cluster=CLUSTER)
    with pytest.raises(ConfigError, match="already exists"):
        add_identity(root, "operator", Role.WORKER, 1)
    with pytest.raises(ConfigError, match="reserved"):
        add_identity(root, "broker", Role.WORKER, 1)
    assert (root / "identities.toml").read_text() == before
    credentials = add_identity(root, "edge7", Role.WORKER, 3)
    assert credentials.cert_file.is_file()
    assert load_registry(StateDir(root)).get("edge7") == Identity("edge7", Role.WORKER, 3)
    assert "nodes/edge7/requests" in (root / "acl").read_text()


def test_load_registry_of_a_folder_that_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="creds init"):
        load_registry(StateDir(tmp_path))
    (tmp_path / "identities.toml").write_text('cluster = "c"\n[[identity]]\nname = "x"\nrole = "king"\n')
    with pytest.raises(ConfigError, match="invalid entry"):
        load_registry(StateDir(tmp_path))


# --- client settings ------------------------------------------------------------------------


def test_client_certificate_settings_are_checked(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    cert.write_text("x")
    key.write_text("x")
    url = "mqtts://127.0.0.1:8883"
    with pytest.raises(ConfigError, match="together"):
        load_settings(BusSettings, {"broker_url": url, "tls_cert_file": cert})
    with pytest.raises(ConfigError, match="mqtts"):
        load_settings(BusSettings, {"broker_url": "mqtt://h:1", "tls_cert_file": cert, "tls_key_file": key})
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(BusSettings, {"broker_url": url, "tls_cert_file": cert,
                                    "tls_key_file": tmp_path / "missing.key"})  # fmt: skip
    settings = load_settings(BusSettings, {"broker_url": url, "tls_cert_file": cert, "tls_key_file": key})
    assert settings.tls_cert_file == cert
    assert BusSettings().tls_cert_file is None  # the default path is unchanged


def test_environment_names_the_client_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tmp_path / "c.crt", tmp_path / "c.key"
    cert.write_text("x")
    key.write_text("x")
    monkeypatch.setenv("EDGESPLIT_BROKER_URL", "mqtts://u:p@127.0.0.1:8883")
    monkeypatch.setenv("EDGESPLIT_TLS_CERT_FILE", str(cert))
    monkeypatch.setenv("EDGESPLIT_TLS_KEY_FILE", str(key))
    settings = load_settings(BusSettings, {})
    assert (settings.tls_cert_file, settings.tls_key_file) == (cert, key)
    assert (settings.broker.username, settings.broker.password) == ("u", "p")
