"""deploy/containers/compose.secure.yaml against what `edgesplit creds compose` writes
(issue #19): every container mounts its own folder, every /secure/... file it names is
there, its variables are settings of its service and load, its identity is its own, the
broker refuses anonymous clients. No container engine needed (the integration test
tests/integration/test_containers.py runs the stack).
"""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from shared.security.compose_export import CONTROL_SERVICES, HEALTH_PREFIX
from shared.security.creds import StateDir, load_registry
from shared.security.role_keys import load_signer
from tests.unit.test_deploy_config import (
    CONTAINERS,
    IMAGE_OF_SCRIPT,
    entry_point,
    interpolate,
    settings_class,
    unknown_variables,
)

ROOT = Path(__file__).resolve().parents[2]
EDGESPLIT = [sys.executable, "-m", "services.cli"]
SECURE_TLS_PORT, SECURE_DATA_PORT = 8883, 8884


def _edgesplit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGESPLIT, *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "EDGESPLIT_GATEWAY_API_KEY": ""})  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(state folder, `creds compose` output) for the compose file's nodes, owned by us."""
    base = tmp_path_factory.mktemp("secure")
    state, out = base / "state", base / "out"
    done = _edgesplit("creds", "init", "--state", str(state), "--cluster", "site",
                      "--topology", str(CONTAINERS / "compose-nodes.toml"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    uid = str(os.geteuid())
    done = _edgesplit("creds", "compose", "--state", str(state), "--out", str(out), "--uid", uid, "--broker-uid", uid)
    assert done.returncode == 0, done.stderr
    return state, out


@typing.no_type_check
def secure_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((CONTAINERS / "compose.secure.yaml").read_text())["services"]


def mounted_folder(service: dict[str, Any], out: Path) -> Path:
    """The folder of ``out`` that ``service`` mounts at /secure (read-only)."""
    values = {"EDGESPLIT_SECURE_DIR": str(out), "EDGESPLIT_SHARDS_HOST_DIR": "/srv/shards"}
    for volume in service["volumes"]:
        source, _, target = interpolate(volume, values).partition(":")
        if target == "/secure:ro":
            return Path(source)
    raise AssertionError(f"no read-only /secure mount in {service['volumes']}")


def test_every_container_runs_as_its_own_identity_with_the_files_it_names(
    exported: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    state, out = exported
    registry = load_registry(StateDir(state))
    services = secure_services()
    workers = {identity.name for identity in registry.identities if identity.role.value == "worker"}
    assert set(services) == {"mosquitto", *CONTROL_SERVICES, "gateway", *workers}
    for name, service in services.items():
        if name == "mosquitto":
            continue
        command = service["command"]
        assert command[0] in IMAGE_OF_SCRIPT and service["image"].startswith(IMAGE_OF_SCRIPT[command[0]] + ":")
        folder = mounted_folder(service, out)
        assert folder == out / name, (name, folder)
        env = {key: interpolate(str(value), {"EDGESPLIT_CLUSTER": "site"})
               for key, value in service["environment"].items()}  # fmt: skip
        assert env["EDGESPLIT_CLIENT_ID"] == name and registry.get(name) is not None, name
        if "EDGESPLIT_NODE_ID" in env:
            assert env["EDGESPLIT_NODE_ID"] == name
        module = entry_point(command[0])
        assert unknown_variables(settings_class(module), env) == [], name
        local = {key: value.replace("/secure/", f"{folder}/") for key, value in env.items()}
        for key, value in local.items():
            if value.startswith(f"{folder}/"):
                assert Path(value).exists(), f"{name}: {key}={env[key]} is not written by creds compose"
        check = service["healthcheck"]["test"]
        for path in [part for part in check if part.startswith("/secure/")]:
            assert (folder / Path(path).name).is_file(), f"{name}: health check's {path}"
        if name != "gateway":  # the gateway's check is HTTP; the others use health-NAME, never their own
            assert "--tls-cert" in check and (folder / "health.crt").is_file()
            assert registry.get(HEALTH_PREFIX + name) is not None
        for key in [key for key in os.environ if key.startswith("EDGESPLIT_")]:
            monkeypatch.delenv(key)
        with monkeypatch.context() as patch:
            for key, value in local.items():
                patch.setenv(key, value)
            settings = module.settings_from(module.parse_args(command[1:]))  # ConfigError: bad value
        assert (settings.broker.scheme, settings.broker.host, settings.broker.port) == \
            ("mqtts", "mosquitto", SECURE_TLS_PORT), name
        assert settings.data_broker_url == f"mqtts://mosquitto:{SECURE_DATA_PORT}", name
        assert settings.tls_cert_file == folder / "tls.crt"
        cert = x509.load_pem_x509_certificate((folder / "tls.crt").read_bytes())
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == name


def test_only_the_processes_that_get_it_hold_the_cluster_key_and_private_role_keys(
    exported: tuple[Path, Path],
) -> None:
    _, out = exported
    assert not (out / "monitor" / "signing.key").exists() and not (out / "gateway" / "signing.key").exists()
    assert not (out / "orchestrator" / "signing.key").exists()
    assert (out / "car" / "signing.key").is_file() and (out / "broadcaster" / "signing.key").is_file()
    assert not (out / "car" / "role-key").exists() and not (out / "gateway" / "role-key").exists()
    for name in ("monitor", "orchestrator", "broadcaster"):
        load_signer(out / name / "role-key" / f"{name}.key")  # its own role's key, loadable as such
    assert (out / "gateway.env").read_text().startswith("EDGESPLIT_GATEWAY_API_KEY=")
    assert oct((out / "car" / "tls.key").stat().st_mode & 0o777) == "0o600"


def test_the_broker_refuses_anonymous_clients_and_serves_its_compose_name(exported: tuple[Path, Path]) -> None:
    _, out = exported
    broker = out / "mosquitto"
    config = (broker / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in config and config.count("require_certificate true") == 2
    assert f"listener {SECURE_TLS_PORT} 0.0.0.0" in config and f"listener {SECURE_DATA_PORT} 0.0.0.0" in config
    assert "listener 1884 127.0.0.1" in config  # the password listener: the container's loopback only
    for line in config.splitlines():
        if line.endswith(("_file /mosquitto/ca.crt", "file /mosquitto/passwords", "file /mosquitto/acl")):
            assert (broker / Path(line.split()[1]).name).is_file(), line
    cert = x509.load_pem_x509_certificate((broker / "broker.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mosquitto" in names.get_values_for_type(x509.DNSName)
    service = secure_services()["mosquitto"]
    assert [interpolate(port, {}) for port in service["ports"]] == [
        f"{SECURE_TLS_PORT}:{SECURE_TLS_PORT}", f"{SECURE_DATA_PORT}:{SECURE_DATA_PORT}"]  # fmt: skip
    assert service["command"] == ["mosquitto", "-c", "/mosquitto/mosquitto.conf"]
    assert " ".join(service["healthcheck"]["test"]).endswith("/dev/tcp/127.0.0.1/1884")  # its loopback listener
    assert mounted_folder({"volumes": [service["volumes"][0].replace(":/mosquitto:ro", ":/secure:ro")]},
                          out) == broker  # fmt: skip


def test_creds_compose_refuses_bad_input_in_one_line(tmp_path: Path, exported: tuple[Path, Path]) -> None:
    state, out = exported
    uid = ["--uid", str(os.geteuid()), "--broker-uid", str(os.geteuid())]
    for args, expected in [
        (["--state", str(tmp_path / "none"), "--out", str(tmp_path / "o1"), *uid], "identities.toml"),
        (["--state", str(state), "--out", str(out), *uid], "not an empty folder"),
        (["--state", str(state), "--out", str(tmp_path / "o2"), "--broker-host", "a b", *uid], "--broker-host"),
        (["--state", str(state), "--out", str(tmp_path / "o3"), "--uid", "x"], "not a user id"),
    ]:
        done = _edgesplit("creds", "compose", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr
