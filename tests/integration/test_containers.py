"""The container path end to end (issue #19): build the images, run the compose stack
from them, and generate through it and through its gateway: the tokens are `edgesplit
generate --local`'s. Then the secure stack (compose.secure.yaml from `edgesplit creds
compose`): a completion through the gateway (API key required) equals `--local`, every
container is healthy, and an MQTT client without a certificate is refused.

Needs root (to install and start a container engine). As root it installs what is
missing (Debian's docker.io, debootstrap, docker-compose), uses the engine DOCKER_HOST
names when one answers, else starts dockerd (vfs storage; its images cached under
~/.cache/edgesplit/docker-vfs so a second run skips most of the build) and stops it after.
Where the engine cannot run, the test is skipped with the reason printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.ports import quiet_ports
from shared.security.creds import StateDir, client_environment
from tests.integration.containers_secure import complete, mqtt_connect, read_api_key

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "deploy" / "containers"
CACHE = Path(os.environ.get("EDGESPLIT_CACHE_DIR", "~/.cache/edgesplit")).expanduser()
EDGESPLIT = [sys.executable, "-m", "services.cli"]
PACKAGES = {"dockerd": "docker.io", "debootstrap": "debootstrap", "docker-compose": "docker-compose"}
PROMPT, NEW_TOKENS = "hello edge", 8
NODES = ("car", "rsu", "edge")
SERVED_WITHIN_S, HEALTHY_WITHIN_S = 300.0, 120.0
CONTAINER_COUNT = 9
"""Mosquitto, four control services, the gateway, three workers."""


def _skip(reason: str) -> None:
    print(f"test_containers skipped: {reason}", file=sys.stderr, flush=True)
    pytest.skip(reason)


def _run(command: list[str], env: Mapping[str, str] | None = None, timeout_s: float = 600,
         check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                            env={**os.environ, **(env or {})}, cwd=ROOT)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")  # fmt: skip
    return result


def _install_missing() -> None:
    missing = sorted({package for binary, package in PACKAGES.items() if shutil.which(binary) is None})
    if not missing:
        return
    apt = {"DEBIAN_FRONTEND": "noninteractive"}
    result = _run(["apt-get", "install", "-y", "-q", *missing], env=apt, timeout_s=900, check=False)
    if result.returncode != 0:
        _run(["apt-get", "update", "-q"], env=apt, timeout_s=600, check=False)
        result = _run(["apt-get", "install", "-y", "-q", *missing], env=apt, timeout_s=900, check=False)
    if result.returncode != 0:
        _skip(f"apt-get install {' '.join(missing)} failed: {result.stderr.strip()[-300:]}")


def _answers(env: Mapping[str, str]) -> bool:
    docker = shutil.which("docker")
    return docker is not None and _run([docker, "info"], env=env, timeout_s=30, check=False).returncode == 0


@contextlib.contextmanager
def _engine() -> Iterator[dict[str, str]]:
    """The environment (DOCKER_HOST) of a container engine that answers; starts dockerd
    (and stops it after) when none does."""
    if os.geteuid() != 0:
        _skip(f"a container engine needs root here (dockerd, vfs storage); running as uid {os.geteuid()}")
    _install_missing()
    if _answers({}):
        yield {}
        return
    run_dir = Path(tempfile.mkdtemp(prefix="edgesplit-dockerd-"))
    docker_socket, pid_file, log_file = run_dir / "docker.sock", run_dir / "dockerd.pid", run_dir / "dockerd.log"
    env = {"DOCKER_HOST": f"unix://{docker_socket}"}
    daemon: subprocess.Popen[bytes] | None = None
    try:
        for attempt in (1, 2):  # on a loaded machine its containerd may miss dockerd's start deadline
            with open(log_file, "ab") as log:
                daemon = subprocess.Popen(
                    ["dockerd", "--storage-driver=vfs", f"--host=unix://{docker_socket}", f"--pidfile={pid_file}",
                     f"--data-root={CACHE / 'docker-vfs'}", f"--exec-root={run_dir / 'exec'}"],
                    stdout=log, stderr=log, start_new_session=True)  # fmt: skip
            deadline = time.monotonic() + 90
            while not _answers(env) and daemon.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if _answers(env):
                break
            _stop(daemon)
            if attempt == 2:
                _skip(f"dockerd did not start (twice): {log_file.read_text()[-500:]}")
        yield env
    finally:
        if daemon is not None:
            _stop(daemon)
        _unmount_under(run_dir)  # dockerd leaves its netns mount in the exec root
        shutil.rmtree(run_dir, ignore_errors=True)


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait(timeout=10)


def _unmount_under(folder: Path) -> None:
    mounts = Path("/proc/mounts").read_text().splitlines()
    points = sorted((line.split()[1] for line in mounts if line.split()[1].startswith(f"{folder}/")),
                    reverse=True)  # fmt: skip
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


OVERRIDE = """\
# the tiny test model is worth splitting only when the entry cannot hold it all: car takes
# the two blocks its memory holds (as deploy/topologies/adaptive-tiny.toml), others the rest
services:
  car:
    environment:
      EDGESPLIT_MEMORY_BYTES: "400000"
"""


def _compose(env: Mapping[str, str], project: str, *args: str, timeout_s: float = 300,
             check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    files = ["-f", str(CONTAINERS / env["COMPOSE_FILE_NAME"]), "-f", env["OVERRIDE_FILE"]]
    # on vfs storage creating a worker's container copies its 1.2 GB file system: more than
    # compose's default 60 s per API call when three start at once on a busy machine
    return _run(["docker-compose", "-p", project, *files, *args],
                env={**env, "COMPOSE_HTTP_TIMEOUT": "900"}, timeout_s=timeout_s, check=check)  # fmt: skip


def _served(status: dict[str, object]) -> bool:
    plan = status.get("plan")
    if not isinstance(plan, dict):
        return False
    nodes = {node["node"]: node for node in status["nodes"]}  # type: ignore[attr-defined]
    needed = {plan["entry_node"], *(segment["node"] for segment in plan["segments"])}
    return all(n in nodes and nodes[n]["state"] == "online" and nodes[n]["epoch"] == plan["epoch"]
               for n in needed)  # fmt: skip


def _wait_served(env: Mapping[str, str], url: str) -> dict[str, object]:
    deadline = time.monotonic() + SERVED_WITHIN_S
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        result = _run([*EDGESPLIT, "status", "--json", "--broker", url, "--wait-s", "1"], env=env, check=False)
        if result.returncode == 0:
            status = json.loads(result.stdout)
            if _served(status):
                return status
        time.sleep(2)
    raise AssertionError(f"no plan served within {SERVED_WITHIN_S:g} s; last status: {status}")


def _health(env: Mapping[str, str], project: str) -> dict[str, str]:
    ids = _compose(env, project, "ps", "-q").stdout.split()
    states = {}
    for container in ids:
        name, health, user = _run(["docker", "inspect", "-f",
                                   "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} "
                                   "{{.Config.User}}", container], env=env).stdout.split()  # fmt: skip
        states[name.strip("/")] = f"{health} as {user}"
    return states


def _all_healthy(env: Mapping[str, str], project: str) -> dict[str, str]:
    """Every container's own health check passes (within HEALTHY_WITHIN_S), none as root."""
    deadline = time.monotonic() + HEALTHY_WITHIN_S
    while True:
        health = _health(env, project)
        if all(state.startswith("healthy") for state in health.values()) or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert len(health) == CONTAINER_COUNT and all(s.startswith("healthy") for s in health.values()), health
    assert all(not state.endswith(" as ") and " as root" not in state for state in health.values()), health
    return health


def _split(plan: dict[str, Any]) -> None:
    """Split across containers: the entry (embedding, head, sampling) and the block hosts;
    the entry may hold no block itself when another trusted node is faster."""
    nodes = {segment["node"] for segment in plan["segments"]} | {plan["entry_node"]}
    assert len(nodes) >= 2 and plan["entry_node"] == "car", plan


@contextlib.contextmanager
def _stack(env: Mapping[str, str]) -> Iterator[None]:
    """``docker-compose up -d`` of ``env``'s project; its logs on failure, ``down -v`` after."""
    project = env["COMPOSE_PROJECT"]
    try:
        _compose(env, project, "up", "-d", timeout_s=1200)
        yield
    except BaseException:
        logs = _compose(env, project, "logs", "--no-color", "--tail", "40", check=False, timeout_s=60)
        print(logs.stdout[-12000:], file=sys.stderr)
        raise
    finally:
        _compose(env, project, "down", "-v", "--remove-orphans", "-t", "10", check=False, timeout_s=120)


@dataclass(frozen=True)
class Built:
    engine: dict[str, str]
    shards: Path
    local: list[int]
    built_s: float


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """The engine, the images, the tiny model's shards and its `--local` tokens."""
    started = time.monotonic()
    tmp_path = tmp_path_factory.mktemp("containers")
    with _engine() as engine:
        env = {**engine, "PYTHON": sys.executable, "EDGESPLIT_IMAGE_TAG": "test"}
        _run([str(CONTAINERS / "build.sh"), "all"], env=env, timeout_s=1500)
        built_s = time.monotonic() - started
        model, shards = tmp_path / "tiny-llama", tmp_path / "shards"
        _run([*EDGESPLIT, "models", "tiny", "llama", "--out", str(model), "--layers", "6"])
        _run([*EDGESPLIT, "shard", str(model), "--out", str(shards)])
        for path in [tmp_path, shards, *shards.rglob("*")]:  # the containers run as uid 10001
            path.chmod(0o755 if path.is_dir() else 0o644)
        local = json.loads(_run([*EDGESPLIT, "generate", "--local", "--model", str(model), "--prompt", PROMPT,
                                 "--max-new-tokens", str(NEW_TOKENS), "--json"]).stdout)  # fmt: skip
        assert len(local["token_ids"]) == NEW_TOKENS
        yield Built(env, shards, local["token_ids"], built_s)


def _stack_env(built: Built, tmp_path: Path, compose_file: str, **more: str) -> dict[str, str]:
    override = tmp_path / "compose.override.yaml"
    override.write_text(OVERRIDE)
    return {**built.engine, "OVERRIDE_FILE": str(override), "COMPOSE_FILE_NAME": compose_file,
            "COMPOSE_PROJECT": f"edgesplit{secrets.token_hex(4)}", "EDGESPLIT_SHARDS_HOST_DIR": str(built.shards),
            "EDGESPLIT_GATEWAY_HTTP_PORT": str(quiet_ports()), **more}  # fmt: skip


def test_the_compose_stack_from_the_images_generates_what_local_generates(built: Built, tmp_path: Path) -> None:
    started = time.monotonic()
    port, cluster = quiet_ports(), f"c{secrets.token_hex(4)}"
    stack = _stack_env(built, tmp_path, "compose.yaml", EDGESPLIT_MQTT_PORT=str(port), EDGESPLIT_CLUSTER=cluster,
                       EDGESPLIT_PLAN_SIGNING_KEY=secrets.token_hex(32))  # fmt: skip
    url = f"mqtt://127.0.0.1:{port}"
    with _stack(stack):
        status = _wait_served(stack, url)
        served = time.monotonic()
        remote = json.loads(_run([*EDGESPLIT, "generate", "--broker", url, "--prompt", PROMPT,
                                  "--max-new-tokens", str(NEW_TOKENS), "--json"], env=stack).stdout)  # fmt: skip
        assert remote["token_ids"] == built.local, (remote, built.local)
        plan: dict[str, Any] = status["plan"]  # type: ignore[assignment]
        _split(plan)
        gateway = f"http://127.0.0.1:{stack['EDGESPLIT_GATEWAY_HTTP_PORT']}"
        code, answer = complete(gateway, plan["model_id"], PROMPT, NEW_TOKENS)
        assert code == 200 and answer["choices"][0]["token_ids"] == built.local, (code, answer)
        _all_healthy(stack, stack["COMPOSE_PROJECT"])
        print(f"\ncontainers: images built in {built.built_s:.0f} s; first plan served "
              f"{served - started:.0f} s after up (model {plan['model_id']!r}, epoch {plan['epoch']}: "
              f"{[(s['node'], s['start'], s['end']) for s in plan['segments']]}); tokens {remote['token_ids']} "
              f"== --local, through the broker and the gateway; all {CONTAINER_COUNT} containers healthy; "
              f"{time.monotonic() - started:.0f} s", flush=True)


def test_the_secure_stack_serves_the_gateway_and_refuses_anonymous_clients(built: Built, tmp_path: Path) -> None:
    started = time.monotonic()
    cluster, state, secure = f"c{secrets.token_hex(4)}", tmp_path / "state", tmp_path / "secure"
    _run([*EDGESPLIT, "creds", "init", "--state", str(state), "--cluster", cluster,
          "--topology", str(CONTAINERS / "compose-nodes.toml")])  # fmt: skip
    _run([*EDGESPLIT, "creds", "compose", "--state", str(state), "--out", str(secure)],
         env={"EDGESPLIT_GATEWAY_API_KEY": ""})  # fmt: skip
    port = quiet_ports(2)  # the data listener is the control port + 1
    stack = _stack_env(built, tmp_path, "compose.secure.yaml", EDGESPLIT_MQTTS_PORT=str(port),
                       EDGESPLIT_MQTTS_DATA_PORT=str(port + 1), EDGESPLIT_CLUSTER=cluster,
                       EDGESPLIT_SECURE_DIR=str(secure))  # fmt: skip
    url = f"mqtts://127.0.0.1:{port}"
    operator = {**stack, **client_environment(StateDir(state), "operator", url)}
    with _stack(stack):
        status = _wait_served(operator, url)
        served = time.monotonic()
        plan: dict[str, Any] = status["plan"]  # type: ignore[assignment]
        _split(plan)
        gateway, key = f"http://127.0.0.1:{stack['EDGESPLIT_GATEWAY_HTTP_PORT']}", read_api_key(secure / "gateway.env")
        code, answer = complete(gateway, plan["model_id"], PROMPT, NEW_TOKENS)
        assert code == 401, (code, answer)
        code, answer = complete(gateway, plan["model_id"], PROMPT, NEW_TOKENS, api_key=key)
        assert code == 200 and answer["choices"][0]["token_ids"] == built.local, (code, answer)
        # no certificate, no entry: plain MQTT on the TLS port, and TLS without a client
        # certificate; with one (the client identity) the same probe is let in
        ca = state / "ca" / "ca.crt"
        plain, no_cert = mqtt_connect(port), mqtt_connect(port, ca_file=ca)
        assert plain.startswith("refused") and no_cert.startswith("refused"), (plain, no_cert)
        identity = mqtt_connect(port, ca_file=ca, cert=(state / "certs" / "client.crt", state / "certs" / "client.key"))
        assert identity == "accepted", identity
        _all_healthy(stack, stack["COMPOSE_PROJECT"])
        print(f"\nsecure containers: first plan served {served - started:.0f} s after creds init (epoch "
              f"{plan['epoch']}); gateway tokens {answer['choices'][0]['token_ids']} == --local (401 without "
              f"the key); anonymous: {plain!r}, {no_cert!r}; all {CONTAINER_COUNT} containers healthy; "
              f"{time.monotonic() - started:.0f} s", flush=True)

