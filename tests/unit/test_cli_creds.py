"""`edgesplit creds`: init, add-node, add-client, list; bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.main import main
from shared.security.acl import Role
from shared.security.creds import StateDir, load_registry


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse errors
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_init_add_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    code, out, _ = run(["creds", "init", "--state", str(state), "--cluster", "site1"], capsys)
    assert code == 0 and "10 identities for cluster site1" in out
    code, out, _ = run(["creds", "add-node", "edge7", "--trust", "3", "--state", str(state)], capsys)
    assert code == 0 and str(state / "certs" / "edge7.crt") in out
    code, out, _ = run(["creds", "add-client", "alice", "--state", str(state)], capsys)
    assert code == 0 and "issued client alice" in out
    code, out, _ = run(["creds", "list", "--json", "--state", str(state)], capsys)
    listed = {i["name"]: (i["role"], i["trust"]) for i in json.loads(out)["identities"]}
    assert listed["edge7"] == ("worker", 3) and listed["alice"] == ("client", 0)
    assert listed["car"] == ("worker", 2)  # from the default topology
    assert listed["gateway"] == ("gateway", 0)  # `up --secure` starts the gateway as it
    registry = load_registry(StateDir(state))
    assert {i.name for i in registry.of_role(Role.WORKER)} == {"car", "rsu", "mec", "edge7"}


@pytest.mark.parametrize("argv", [
    ["creds", "add-node", "w/1", "--trust", "1"],
    ["creds", "add-node", "w1", "--trust", "11"],
    ["creds", "add-node", "w1", "--trust", "high"],
    ["creds", "add-node", "w1"],
    ["creds", "add-node", "car", "--trust", "1"],  # exists
    ["creds", "init"],  # already initialised
    ["creds", "init", "--topology", "/no/such.toml"],
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(argv: list[str], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    state = tmp_path / "state"
    assert run(["creds", "init", "--state", str(state)], capsys)[0] == 0
    before = sorted(p.name for p in (state / "certs").iterdir())
    code, _, err = run([*argv, "--state", str(state)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("edgesplit: error:") and "Traceback" not in err
    assert sorted(p.name for p in (state / "certs").iterdir()) == before  # nothing overwritten


def test_list_of_a_missing_state_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["creds", "list", "--state", str(tmp_path / "none")], capsys)
    assert code == 2 and "creds init" in err


def test_up_secure_refuses_a_state_folder_of_another_cluster_or_without_its_nodes(tmp_path: Path) -> None:
    from services.cli.secure_up import start_secure_broker_for
    from shared.config import BusSettings
    from shared.errors import ConfigError
    from shared.security.creds import init_state
    from shared.topology import DEFAULT_TOPOLOGY, load_topology

    topology = load_topology(DEFAULT_TOPOLOGY)
    init_state(tmp_path / "other", topology, cluster="elsewhere")
    with pytest.raises(ConfigError, match="cluster 'elsewhere'"):
        start_secure_broker_for(BusSettings(cluster="here"), tmp_path / "other", topology, None, tmp_path / "b")
    init_state(tmp_path / "bare", None, cluster="here")
    with pytest.raises(ConfigError, match="no identity for car, rsu, mec"):
        start_secure_broker_for(BusSettings(cluster="here"), tmp_path / "bare", topology, None, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # refused before any broker started


def _without_gateway(root: Path) -> None:
    """Make ``root`` look like a state folder made before the gateway identity existed."""
    state = StateDir(root)
    registry = state.registry.read_text()
    block = '\n[[identity]]\nname = "gateway"\nrole = "gateway"\ntrust = 0\n'
    assert block in registry
    state.registry.write_text(registry.replace(block, ""))
    for name in ("gateway.crt", "gateway.key"):
        (state.certs / name).unlink()
    (state.secrets / "gateway.password").unlink()
    kept = [line for line in state.passwords.read_text().splitlines() if not line.startswith("gateway:")]
    state.passwords.write_text("\n".join(kept) + "\n")


def test_up_secure_adds_the_gateway_identity_to_an_older_state_folder(tmp_path: Path) -> None:
    from services.cli.secure_up import start_secure_broker_for
    from shared.config import BusSettings
    from shared.errors import ConfigError
    from shared.security.creds import init_state
    from shared.topology import DEFAULT_TOPOLOGY, load_topology

    init_state(tmp_path / "old", None, cluster="here")
    _without_gateway(tmp_path / "old")
    assert load_registry(StateDir(tmp_path / "old")).get("gateway") is None
    with pytest.raises(ConfigError, match="no identity for car, rsu, mec"):  # stops before any broker
        start_secure_broker_for(BusSettings(cluster="here"), tmp_path / "old", load_topology(DEFAULT_TOPOLOGY),
                                None, tmp_path / "b")  # fmt: skip
    state = StateDir(tmp_path / "old")
    added = load_registry(state).get("gateway")
    assert added is not None and added.role is Role.GATEWAY
    assert state.credentials("gateway").cert_file.is_file()
    assert "user gateway\n" in state.acl.read_text()


def test_the_gateway_api_key_is_made_once_0600_and_the_environment_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat

    from services.cli.secure_up import API_KEY_ENV, gateway_api_key
    from shared.errors import ConfigError

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    key, source = gateway_api_key(tmp_path)
    assert source == str(tmp_path / "gateway-api-key") and len(key) >= 40
    assert stat.S_IMODE((tmp_path / "gateway-api-key").stat().st_mode) == 0o600
    assert gateway_api_key(tmp_path) == (key, source)  # reused, not remade
    monkeypatch.setenv(API_KEY_ENV, "sk-mine")
    assert gateway_api_key(tmp_path) == ("sk-mine", f"${API_KEY_ENV}")
    monkeypatch.delenv(API_KEY_ENV)
    (tmp_path / "gateway-api-key").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        gateway_api_key(tmp_path)
