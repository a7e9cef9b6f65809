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
    assert code == 0 and "9 identities for cluster site1" in out
    code, out, _ = run(["creds", "add-node", "edge7", "--trust", "3", "--state", str(state)], capsys)
    assert code == 0 and str(state / "certs" / "edge7.crt") in out
    code, out, _ = run(["creds", "add-client", "alice", "--state", str(state)], capsys)
    assert code == 0 and "issued client alice" in out
    code, out, _ = run(["creds", "list", "--json", "--state", str(state)], capsys)
    listed = {i["name"]: (i["role"], i["trust"]) for i in json.loads(out)["identities"]}
    assert listed["edge7"] == ("worker", 3) and listed["alice"] == ("client", 0)
    assert listed["car"] == ("worker", 2)  # from the default topology
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
