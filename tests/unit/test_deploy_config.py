"""The container and Kubernetes files name only what the code has (issue #19).

Every command in deploy/containers/compose.yaml and deploy/k8s/*.yaml is an entry point
of pyproject.toml whose parser takes its arguments; every EDGESPLIT_* variable given to
it is a field of that service's settings class, and the whole environment loads (values
too); every port is the broker's listener port; the images install what their services
import; the Dockerfiles pass hadolint and the manifests the Kubernetes schema
(kubernetes-validate). Nothing here needs a container engine.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "deploy" / "containers"
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
BROKER_PORT = 1883
GATEWAY_PORT = 8000
"""The gateway's HTTP port in every container file (EDGESPLIT_GATEWAY_PORT)."""
BROKER_CONFIG = {"port": BROKER_PORT, "bind_address": "0.0.0.0", "user": "mosquitto",
                 "data_dir": "/var/lib/mosquitto"}  # fmt: skip
"""How build.sh and the ConfigMap render deploy/mosquitto/mosquitto.conf."""
IMAGE_OF_SCRIPT = {
    "edgesplit-monitor": "edgesplit-control", "edgesplit-orchestrator": "edgesplit-control",
    "edgesplit-split-reviser": "edgesplit-control", "edgesplit-broadcaster": "edgesplit-control",
    "edgesplit-gateway": "edgesplit-control", "edgesplit-worker": "edgesplit-worker",
}  # fmt: skip
REQUIRED_VALUES = {"EDGESPLIT_PLAN_SIGNING_KEY": "ab" * 32, "EDGESPLIT_SHARDS_HOST_DIR": "/srv/shards"}
"""Values for the ${VAR:?...} variables compose.yaml insists on."""


# --- reading the files ------------------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load((CONTAINERS / "compose.yaml").read_text())["services"]
    return services


def k8s_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]  # fmt: skip


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against ``environ``."""

    def one(match: re.Match[str]) -> str:
        name, operator, rest = match.group(1), match.group(2), match.group(3)
        if name in environ:
            return environ[name]
        if operator == ":-":
            return rest
        raise AssertionError(f"${{{name}}} has no value and no default")

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", one, value)


@typing.no_type_check
def containers() -> Iterator[tuple[str, str, list[str], dict[str, str]]]:
    """(where, image, command, environment) of every edgesplit container in compose and k8s."""
    for name, service in compose_services().items():
        if "command" not in service:
            continue  # the broker
        env = {key: interpolate(str(value), REQUIRED_VALUES) for key, value in service["environment"].items()}
        yield f"compose:{name}", interpolate(service["image"], {}), service["command"], env
    for doc in k8s_documents():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if container["name"] == "mosquitto":
                continue
            env = {}
            for item in container.get("env", []):
                if "value" in item:
                    env[item["name"]] = item["value"]
                else:  # the downward API: a StatefulSet pod's name
                    assert item["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, item
                    env[item["name"]] = f"{doc['metadata']['name']}-0"
            yield f"k8s:{doc['metadata']['name']}", container["image"], container["command"], env


def entry_point(script: str) -> Any:
    module_name, _, function = SCRIPTS[script].partition(":")
    assert function == "main", script
    return importlib.import_module(module_name)


def settings_class(module: Any) -> type[BaseSettings]:
    cls = typing.get_type_hints(module.settings_from)["return"]
    assert issubclass(cls, BaseSettings)
    return typing.cast(type[BaseSettings], cls)


def unknown_variables(cls: type[BaseSettings], environment: Mapping[str, str]) -> list[str]:
    """The EDGESPLIT_* names of ``environment`` that are no field of ``cls``."""
    prefix = cls.model_config.get("env_prefix", "")
    fields = {f"{prefix}{name}".upper() for name in cls.model_fields}
    return sorted(name for name in environment if name.startswith("EDGESPLIT_") and name not in fields)


# --- commands, variables, ports ---------------------------------------------------------


def test_compose_and_manifests_run_every_service_and_only_existing_entry_points() -> None:
    found = list(containers())
    scripts = {command[0] for _, _, command, _ in found}
    assert scripts == set(IMAGE_OF_SCRIPT), scripts
    for where, image, command, _ in found:
        assert command[0] in SCRIPTS, f"{where}: {command[0]} is no entry point of pyproject.toml"
        assert image.partition(":")[0] == IMAGE_OF_SCRIPT[command[0]], f"{where}: {command[0]} in {image}"
        entry_point(command[0]).parse_args(command[1:])  # exits 2 on an unknown argument


def test_every_variable_is_a_setting_of_its_service_and_the_environment_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for where, _, command, environment in containers():
        module = entry_point(command[0])
        cls = settings_class(module)
        assert unknown_variables(cls, environment) == [], f"{where}: not settings of {cls.__name__}"
        for name in [key for key in os.environ if key.startswith("EDGESPLIT_")]:
            monkeypatch.delenv(name)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        settings = module.settings_from(module.parse_args(command[1:]))  # ConfigError: bad value
        assert settings.broker.port == BROKER_PORT and settings.broker.host == "mosquitto", where


def test_the_check_catches_a_variable_no_setting_has() -> None:
    cls = settings_class(entry_point("edgesplit-worker"))
    environment = {"EDGESPLIT_NODE_ID": "car", "EDGESPLIT_TRUST": "3", "EDGESPLIT_TRUST_LEVEL": "3"}
    assert unknown_variables(cls, environment) == ["EDGESPLIT_TRUST_LEVEL"]


def test_every_port_is_the_brokers_listener() -> None:
    template = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    rendered = template.format(**BROKER_CONFIG)
    assert f"listener {BROKER_PORT} 0.0.0.0" in rendered
    build = (CONTAINERS / "build.sh").read_text()
    assert ", ".join(f"{key}={value!r}" for key, value in BROKER_CONFIG.items()) in build
    assert f"EXPOSE {BROKER_PORT}\n" in (CONTAINERS / "Dockerfile.mosquitto").read_text()
    broker = compose_services()["mosquitto"]
    assert [interpolate(port, {}) for port in broker["ports"]] == [f"{BROKER_PORT}:{BROKER_PORT}"]
    assert f"/dev/tcp/127.0.0.1/{BROKER_PORT}" in " ".join(broker["healthcheck"]["test"])
    by_kind = {(doc["kind"], doc["metadata"]["name"]): doc for doc in k8s_documents()}
    assert by_kind["ConfigMap", "mosquitto-config"]["data"]["edgesplit.conf"].rstrip() == rendered.rstrip()
    pod = by_kind["Deployment", "mosquitto"]["spec"]["template"]["spec"]["containers"][0]
    assert pod["ports"] == [{"name": "mqtt", "containerPort": BROKER_PORT, "protocol": "TCP"}]
    service_ports = by_kind["Service", "mosquitto"]["spec"]["ports"]
    assert service_ports == [{"name": "mqtt", "port": BROKER_PORT, "targetPort": "mqtt", "protocol": "TCP"}]
    for doc in k8s_documents():  # nothing else listens but the gateway: the rest are MQTT clients
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert "ports" not in container or container["name"] in ("mosquitto", "gateway"), doc["metadata"]["name"]
    for name, service in compose_services().items():
        assert "ports" not in service or name in ("mosquitto", "gateway"), name


def test_the_gateway_listens_where_its_ports_health_checks_and_service_say(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """compose and k8s publish the port the gateway's settings make it listen on, on all
    addresses, and check its /health there."""
    for name in [key for key in os.environ if key.startswith("EDGESPLIT_")]:
        monkeypatch.delenv(name)
    gateways = {where: env for where, _, command, env in containers() if command[0] == "edgesplit-gateway"}
    assert set(gateways) == {"compose:gateway", "k8s:gateway"}, gateways
    module = entry_point("edgesplit-gateway")
    for where, environment in gateways.items():
        with monkeypatch.context() as patch:
            for key, value in environment.items():
                patch.setenv(key, value)
            settings = module.settings_from(module.parse_args([]))
        assert (settings.gateway_host, settings.gateway_port) == ("0.0.0.0", GATEWAY_PORT), where
        assert settings.metrics_port is not None and settings.metrics_host == "0.0.0.0", where
    service = compose_services()["gateway"]
    assert [interpolate(port, {}) for port in service["ports"]] == [f"{GATEWAY_PORT}:{GATEWAY_PORT}"]
    check = service["healthcheck"]["test"]
    assert check[1:] == ["edgesplit", "health", "--gateway", f"http://127.0.0.1:{GATEWAY_PORT}"], check
    build_parser().parse_args(check[2:])
    by_kind = {(doc["kind"], doc["metadata"]["name"]): doc for doc in k8s_documents()}
    pod = by_kind["Deployment", "gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"} in pod["ports"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert pod[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert by_kind["Service", "gateway"]["spec"]["ports"] == [
        {"name": "http", "port": GATEWAY_PORT, "targetPort": "http", "protocol": "TCP"}]
    labels = by_kind["Deployment", "gateway"]["spec"]["template"]["metadata"]["labels"]
    assert by_kind["Service", "gateway"]["spec"]["selector"].items() <= labels.items()


def test_dockerfile_commands_and_health_checks_exist() -> None:
    commands = []
    for name in ("control", "worker"):
        text = (CONTAINERS / f"Dockerfile.{name}").read_text()
        for line in text.splitlines():
            if line.startswith("CMD ") or line.startswith("HEALTHCHECK "):
                commands.append(json.loads(line[line.index("["):]))
        assert re.search(r"^USER 10001:10001$", text, re.M), f"Dockerfile.{name} runs as root"
    assert ["edgesplit", "health"] in commands
    for command in commands:
        assert command[0] == "edgesplit" or command[0] in SCRIPTS, command
        if command[0] == "edgesplit":
            try:
                build_parser().parse_args(command[1:])
            except SystemExit as done:  # --help
                assert done.code == 0, command
    for doc in k8s_documents():  # the k8s probes run the same check (the gateway's: GET /health)
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if container["name"] not in ("mosquitto", "gateway"):
                assert container["livenessProbe"]["exec"]["command"] == ["edgesplit", "health"]


# --- what the images install ------------------------------------------------------------

IMAGE_MODULES = {
    "control": ["services.monitor.__main__", "services.orchestrator.__main__",
                "services.split_reviser.__main__", "services.broadcaster.__main__",
                "services.gateway.__main__", "services.gateway.service"],
    "worker": ["services.worker.__main__", "shared.model.shard", "shared.model.tokenizer"],
}  # fmt: skip
"""What each image runs (and `edgesplit health`, `status`: the CLI's parser, in both)."""
OPTIONAL = {"tqdm", "pysocks"}
"""Imported only when installed, with a fallback otherwise (torch.hub; paho-mqtt's proxy
support, present in a test environment because selenium depends on it)."""


def requirements(image: str) -> dict[str, str]:
    pins = {}
    for line in (CONTAINERS / f"requirements-{image}.txt").read_text().splitlines():
        spec = line.partition("#")[0].strip()
        if spec:
            name, _, version = spec.partition("==")
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("image", sorted(IMAGE_MODULES))
def test_each_image_installs_every_distribution_its_services_import(image: str) -> None:
    program = (
        "import importlib, json, sys\n"
        "before = set(sys.modules)  # the interpreter's start-up (site .pth hooks) is no import\n"
        "from importlib.metadata import packages_distributions\n"
        f"for name in {IMAGE_MODULES[image]!r}: importlib.import_module(name)\n"
        "from services.cli.main import build_parser; build_parser()\n"
        "found = {n.split('.')[0] for n in set(sys.modules) - before} - set(sys.stdlib_module_names)\n"
        "owners = packages_distributions()\n"
        "print(json.dumps(sorted({d for m in found for d in owners.get(m, [])})))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, check=True)  # fmt: skip
    imported = {canonical(name) for name in json.loads(result.stdout)} - {"edgesplit"} - OPTIONAL
    missing = imported - set(requirements(image))
    assert not missing, f"requirements-{image}.txt lacks {sorted(missing)}"
    if image == "control":
        assert "torch" not in imported and "torch" not in requirements(image)


@pytest.mark.parametrize("image", sorted(IMAGE_MODULES))
def test_image_pins_are_the_versions_tested_here(image: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    constraints = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            constraints[canonical(name)] = pinned.strip()
    for name, pinned in requirements(image).items():
        assert constraints.get(name, pinned) == pinned, f"{name}: {pinned} vs constraints.txt"
        try:
            installed = version(name).partition("+")[0]  # torch's +cpu
        except PackageNotFoundError:
            pytest.fail(f"{name} is pinned for the {image} image but not installed here")
        assert installed == pinned, f"{name}: image {pinned}, tested {installed}"


# --- linters ----------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint() -> None:
    dockerfiles = sorted(str(path) for path in CONTAINERS.glob("Dockerfile.*"))
    assert len(dockerfiles) == 3
    result = subprocess.run([str(BIN / "hadolint"), *dockerfiles], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_manifests_pass_the_kubernetes_schema() -> None:
    manifests = sorted(str(path) for path in K8S.glob("*.yaml"))
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", *manifests],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = sorted(doc["kind"] for doc in k8s_documents())
    assert kinds.count("Deployment") == 6 and kinds.count("StatefulSet") == 2, kinds


def test_worker_pods_carry_their_trust_and_run_only_on_machines_of_that_tier() -> None:
    for doc in k8s_documents():
        if doc["kind"] != "StatefulSet":
            continue
        pod = doc["spec"]["template"]
        env = {item["name"]: item.get("value") for item in pod["spec"]["containers"][0]["env"]}
        assert pod["metadata"]["labels"]["edgesplit.io/trust"] == env["EDGESPLIT_TRUST"]
        assert set(pod["spec"]["nodeSelector"]) == {"edgesplit.io/trust-tier"}
        assert urlsplit(env["EDGESPLIT_BROKER_URL"]).hostname == "mosquitto"
