"""One policy's local stack: its own Mosquitto on a free port, one worker process per
topology node, and the control services with the orchestrator under that policy.

Process control (start, kill, restart, stop) is blocking work: the runner calls these
methods off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

from services.cli.launcher import start_service, start_worker
from shared.broker import LocalBroker, free_port, start_local_broker
from shared.config import BusSettings, load_settings
from shared.errors import ConfigError, ServingError
from shared.security.signing import ensure_key_file
from shared.topology import Topology

# Faster reactions than the interactive defaults: a scenario's events come seconds apart.
ORCHESTRATOR_ARGS = ("--period-s", "2", "--dwell-s", "5", "--observe-s", "5")
COMPRESSED_PRECISION = {"activations": ["fp32", "fp16", "int8"],
                        "activation_loss": {"fp16": 0.001, "int8": 0.01}, "quality_budget": 0.03}
"""The ``compressed`` policy's precision policy (docs/PLANNER.md, "Precision"): fp16 or
int8 on a hop where it saves at least 1 ms per token, at most three int8 hops. The losses
are the policy's assumptions, not measurements: the report measures what the answers
lost against the unsplit fp32 reference (report.json ``quality``)."""


def orchestrator_policy_args(policy: str) -> list[str]:
    """The orchestrator's options for a scenario policy (``compressed``: adaptive with
    ``COMPRESSED_PRECISION``)."""
    if policy == "compressed":
        return ["--policy", "adaptive", "--precision-policy", json.dumps(COMPRESSED_PRECISION)]
    return ["--policy", policy]


class ScenarioStack:
    """What one policy's run started, so that it can stop exactly that."""

    def __init__(self, policy: str, topology: Topology, topology_path: Path, shards: Path,
                 run_dir: Path, late_nodes: frozenset[str] = frozenset(), first_plan: str = "") -> None:  # fmt: skip
        self.policy = policy
        self.first_plan = first_plan
        """``node:start:end,...``: every policy's orchestrator starts from it (`first_plan.py`)."""
        self.topology = topology
        self.topology_path = topology_path
        self.shards = shards
        self.run_dir = run_dir
        self.late_nodes = late_nodes
        """Nodes that only start at their ``join`` event."""
        self.port = free_port()
        self.settings = load_settings(
            BusSettings, {"broker_url": f"mqtt://127.0.0.1:{self.port}", "cluster": f"scenario-{policy}"}
        )
        self.broker: LocalBroker | None = None
        self.env: dict[str, str] = {}
        """Every process's control key (EDGESPLIT_PLAN_SIGNING_KEY_FILE), set with the broker."""
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.services: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    # --- start ------------------------------------------------------------------------------

    def start_broker(self) -> None:
        clear_run_dir(self.run_dir)
        key_file = ensure_key_file(self.run_dir)  # no default key: one per run folder
        self.settings = load_settings(BusSettings, {**self.settings.model_dump(), "plan_signing_key_file": key_file})
        self.env = {"EDGESPLIT_PLAN_SIGNING_KEY_FILE": str(key_file)}
        self.broker = start_local_broker(port=self.port, data_dir=self.run_dir / "broker")

    def start_workers(self) -> None:
        for node in self.topology.nodes:
            if node.id not in self.late_nodes:
                self.start_worker(node.id)

    def start_worker(self, node: str) -> None:
        running = self.workers.get(node)
        if running is not None and running.poll() is None:
            raise ServingError(f"node {node} is already running")
        self.workers[node] = start_worker(node, self.settings, self.shards, self.topology_path, self.log(node),
                                          self.env)  # fmt: skip

    def start_control(self) -> None:
        """Split reviser, monitor, broadcaster and the orchestrator under ``policy``."""
        first = ",".join(n.id for n in self.topology.nodes if n.id not in self.late_nodes)
        shards = ["--shards", str(self.shards)]
        services = {
            "split_reviser": shards,
            "monitor": ["--topology", str(self.topology_path), *shards],
            "broadcaster": shards,
            "orchestrator": [*shards, "--entry", self.topology.entry_node().id, "--expect-nodes", first,
                             "--private-blocks", str(self.topology.private_blocks),
                             "--trusted-level", str(self.topology.trusted_level),
                             *orchestrator_policy_args(self.policy), *ORCHESTRATOR_ARGS,
                             *(["--first-plan", self.first_plan] if self.first_plan else [])],
        }  # fmt: skip
        for name, args in services.items():
            self.services[name] = start_service(name, args, self.settings, self.log(name), self.env)

    # --- events -----------------------------------------------------------------------------

    def kill(self, node: str) -> None:
        """SIGKILL the node's worker (a crash: nothing is cleaned up)."""
        process = self._running(node)
        process.kill()
        process.wait(timeout=10)

    def leave(self, node: str) -> None:
        """SIGTERM the node's worker (a graceful departure)."""
        process = self._running(node)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def _running(self, node: str) -> subprocess.Popen[bytes]:
        process = self.workers.get(node)
        if process is None or process.poll() is not None:
            raise ConfigError(f"node {node} is not running")
        return process

    def dead(self) -> str | None:
        """A control service that exited (workers may be killed on purpose)."""
        for name, process in self.services.items():
            if process.poll() is not None:
                return name
        return None

    # --- stop -------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every process it started, then the broker; never raises."""
        processes = [*self.services.values(), *self.workers.values()]
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout=5)
        if self.broker is not None:
            self.broker.stop()


def clear_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` ready for a fresh stack: the broker's persistence of an earlier run
    into the same folder would hand the new stack that run's retained plan, ledger and
    decisions (a static run then kept the old run's first plan), and its logs would mix
    with the new ones. The control key stays (one per run folder)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "broker", ignore_errors=True)
    for log in run_dir.glob("*.log"):
        log.unlink(missing_ok=True)

