"""Test helper: the whole stack spread over network namespaces (tests/integration/netns.py).

Host 0 runs Mosquitto, the four control services and `edgesplit serve-shards`; the other
hosts run workers, which fetch their shards over HTTP from host 0 (``--shards-url``,
each worker its own cache) and reach the broker at host 0's address. The test process
is the client, from the bridge's address in the root namespace.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.broker import CONFIG_TEMPLATE, find_mosquitto, mqtt_answers
from tests.integration.cluster import KEY_ENV
from tests.integration.fullstack import ROOT, Stack
from tests.integration.netns import Hosts

BROKER_PORT = 1883
SHARDS_PORT = 8765


def start_broker(hosts: Hosts, host: int, data_dir: Path, timeout_s: float = 15.0) -> subprocess.Popen[bytes]:
    """Mosquitto with the project's config, listening on ``host``'s address only."""
    binary = find_mosquitto()
    assert binary is not None, "mosquitto is not installed (apt-get install -y mosquitto)"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "mosquitto.conf"
    config.write_text(CONFIG_TEMPLATE.read_text().format(
        port=BROKER_PORT, data_dir=data_dir, user=getpass.getuser(), bind_address=hosts.address(host)))  # fmt: skip
    process = hosts.spawn(host, [binary, "-c", str(config)], data_dir / "mosquitto.log")
    deadline = time.monotonic() + timeout_s
    while not mqtt_answers(hosts.address(host), BROKER_PORT, timeout_s=0.5):
        assert time.monotonic() < deadline, f"mosquitto in {hosts.namespace(host)} did not answer"
        time.sleep(0.1)
    return process


def start_shard_server(hosts: Hosts, host: int, shards: Path, log: Path,
                       timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:  # fmt: skip
    """`edgesplit serve-shards` on ``host``; returns it and its URL once it answers."""
    url = f"http://{hosts.address(host)}:{SHARDS_PORT}/"
    process = hosts.spawn(host, [sys.executable, "-m", "services.cli", "serve-shards", str(shards),
                       "--host", hosts.address(host), "--port", str(SHARDS_PORT)], log, cwd=ROOT)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "manifest.json", timeout=1):  # noqa: S310 - a test URL
                return process, url
        except OSError:
            assert time.monotonic() < deadline, f"serve-shards on {url} did not answer; see {log}"
            time.sleep(0.2)


@dataclass
class NetnsStack(Stack):
    """A ``Stack`` whose processes run in ``hosts``: control services on host 0, each
    worker on ``placement[node]``."""

    hosts: Hosts | None = None
    placement: dict[str, int] = field(default_factory=dict)
    shards_url: str = ""

    def host_of(self, name: str) -> int:
        return self.placement.get(name, 0)

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        assert self.hosts is not None
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **KEY_ENV, **(env or {})}
        argv = [sys.executable, *command, "--broker", self.broker_url, "--cluster", self.cluster]
        self.processes[name] = self.hosts.spawn(self.host_of(name), argv, self.root / f"{name}.log",
                                                env=full_env, cwd=ROOT)  # fmt: skip

    def start_worker(self, node: str) -> None:
        env = {**self.worker_env, "EDGESPLIT_SHARD_CACHE_DIR": str(self.root / f"cache-{node}")}
        self._spawn(node, ["-m", "services.worker", "--node-id", node, "--shards-url", self.shards_url,
                           "--topology", str(self.topology)], env)  # fmt: skip
