"""Test helper: the whole control plane (monitor, split reviser, broadcaster, orchestrator)
and worker processes on a real broker, for fault-injection tests. Faults are real signals
to real processes; nothing re-plans by hand."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.cli.client import ClientOptions, request
from shared.bus import Bus
from shared.messages import GenerateRequest, NodeStatus, Plan, RequestFinished, TokenGenerated
from shared.model.pipeline import LocalPipeline
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.topics import NODE_STATUS, PLAN
from tests.integration.cluster import KEY_ENV, settings_for

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("monitor", "split_reviser", "broadcaster", "orchestrator")


Node = tuple[str, int, float, float]
"""(id, trust, speed, memory bytes) of a topology node."""


def topology_text(nodes: Sequence[Node], entry: str, private_blocks: int = 1,
                  one_way: Sequence[tuple[str, str]] = ()) -> str:  # fmt: skip
    """A topology TOML, every pair of nodes linked at 50 MB/s both ways, except the pairs
    in ``one_way``: (src, dst) only."""
    lines = ['name = "faults"', f"private_blocks = {private_blocks}", "trusted_level = 2"]
    for node, trust, speed, memory in nodes:
        lines += ["[[nodes]]", f'id = "{node}"', f"trust = {trust}", f"memory_bytes = {memory}",
                  f"speed = {speed}", "threads = 1"] + (["entry = true"] if node == entry else [])  # fmt: skip
    ids = [node[0] for node in nodes]
    for i, src in enumerate(ids):
        for dst in ids[i + 1 :]:
            pair = next(((a, b) for a, b in one_way if {a, b} == {src, dst}), (src, dst))
            lines += ["[[links]]", f'src = "{pair[0]}"', f'dst = "{pair[1]}"', "bandwidth_bytes_per_s = 50e6",
                      "latency_s = 0.001", f"symmetric = {'false' if pair in one_way else 'true'}"]  # fmt: skip
    return "\n".join(lines) + "\n"


@dataclass
class Stack:
    """Processes of one emulated site; ``stop()`` ends them all."""

    broker_url: str
    cluster: str
    root: Path
    nodes: Sequence[Node]
    entry: str
    worker_env: dict[str, str] = field(default_factory=dict)
    service_env: dict[str, str] = field(default_factory=dict)
    """Extra variables of the control services (e.g. EDGESPLIT_IDENTITIES_FILE)."""
    one_way: Sequence[tuple[str, str]] = ()
    role_keys: Path | None = None
    """A folder of ensure_role_keys: every process gets the public keys, the broadcaster,
    orchestrator and monitor their own private key (shared/security/role_keys.py)."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model_dir = write_tiny_checkpoint("llama", self.root / "model", layers=6, seed=11)
        self.shards = self.root / "shards"
        write_shards(self.model_dir, self.shards)
        self.topology = self.root / "topology.toml"
        self.topology.write_text(topology_text(self.nodes, self.entry, one_way=self.one_way))
        # the helpers' control key, and the roles' public keys when the stack signs with them
        # (the client then checks that the broadcaster signed the plan it follows)
        keys = {"role_keys_dir": self.role_keys / "public"} if self.role_keys is not None else {}
        self.settings = settings_for(self.broker_url, self.cluster, **keys)
        self.local = LocalPipeline(self.model_dir, ())
        self._expected: dict[tuple[int, ...], tuple[int, ...]] = {}

    # --- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **KEY_ENV, **(env or {})}
        if self.role_keys is not None:
            full_env["EDGESPLIT_ROLE_KEYS_DIR"] = str(self.role_keys / "public")
            if (self.role_keys / "private" / f"{name}.key").is_file():
                full_env["EDGESPLIT_ROLE_KEY_FILE"] = str(self.role_keys / "private" / f"{name}.key")
        with open(self.root / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, *command, "--broker", self.broker_url, "--cluster", self.cluster],
                stdout=log, stderr=log, cwd=ROOT, env=full_env, start_new_session=True,
            )  # fmt: skip

    def start_worker(self, node: str) -> None:
        self._spawn(node, ["-m", "services.worker", "--node-id", node, "--shards", str(self.shards),
                           "--topology", str(self.topology)], self.worker_env)  # fmt: skip

    def start_service(self, name: str) -> None:
        nodes = ",".join(node[0] for node in self.nodes)
        args = {
            "monitor": ["--topology", str(self.topology), "--shards", str(self.shards)],
            "split_reviser": ["--shards", str(self.shards)],
            "broadcaster": ["--shards", str(self.shards)],
            "orchestrator": ["--shards", str(self.shards), "--entry", self.entry, "--expect-nodes", nodes,
                             "--private-blocks", "1", "--trusted-level", "2"],
        }[name]  # fmt: skip
        self._spawn(name, ["-m", f"services.{name}", *args], self.service_env)

    def start(self, timeout_s: float = 90.0) -> Plan:
        for node, *_ in self.nodes:
            self.start_worker(node)
        for name in SERVICES:
            self.start_service(name)
        return asyncio.run(self.wait_served(lambda plan: True, timeout_s))

    def signal(self, name: str, sig: int) -> None:
        self.processes[name].send_signal(sig)

    def kill(self, name: str) -> None:
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    # --- plans ------------------------------------------------------------------------------

    async def wait_served(self, accept: Callable[[Plan], bool], timeout_s: float) -> Plan:
        """The retained plan, once ``accept(plan)`` and every node of it reports serving it."""
        statuses: dict[str, NodeStatus] = {}
        plan: Plan | None = None
        async with Bus(self.settings) as bus, bus.subscribe(PLAN) as plans, bus.subscribe(NODE_STATUS) as nodes:
            async with asyncio.timeout(timeout_s):
                while True:
                    for subscription in (plans, nodes):
                        try:
                            async with asyncio.timeout(0.1):
                                _, message = await subscription.get()
                        except TimeoutError:
                            continue
                        if isinstance(message, Plan):
                            plan = message
                        else:
                            statuses[message.node] = message
                    if plan is not None and accept(plan) and all(
                        statuses.get(n) is not None and statuses[n].state == "online" and statuses[n].epoch == plan.epoch
                        for n in {plan.entry_node, *(s.node for s in plan.segments)}
                    ):
                        return plan

    async def current_plan(self) -> Plan:
        async with Bus(self.settings) as bus, bus.subscribe(PLAN) as plans:
            return (await plans.get()).message

    # --- requests -------------------------------------------------------------------------

    def expected(self, prompt: Sequence[int], tokens: int) -> tuple[int, ...]:
        key = (*prompt, -1, tokens)
        if key not in self._expected:
            self._expected[key] = tuple(self.local.generate(list(prompt), tokens).token_ids)
        return self._expected[key]

    async def generate(self, request_id: str, prompt: Sequence[int], tokens: int, timeout_s: float,
                       arrivals: list[tuple[int, float]] | None = None) -> RequestFinished:  # fmt: skip
        """One request through the client library; ``arrivals`` gets (index, monotonic s)."""

        def on_token(token: TokenGenerated) -> None:
            if arrivals is not None:
                arrivals.append((token.index, time.monotonic()))

        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id=request_id, reply_to=client, token_ids=tuple(prompt),  # type: ignore[arg-type]
                                   max_new_tokens=tokens, timeout_s=timeout_s)  # fmt: skip

        result = await request(ClientOptions(self.settings, timeout_s=timeout_s), make, on_token)
        assert isinstance(result, RequestFinished)
        return result


def counters(log: str) -> dict[str, int]:
    """The counters a worker logs when it stops (``counters {...}``), summed over restarts."""
    import ast

    total: dict[str, int] = {}
    for line in log.splitlines():
        marker = line.find("counters {")
        if marker >= 0:
            for key, value in ast.literal_eval(line[marker + len("counters ") :]).items():
                total[key] = total.get(key, 0) + int(value)
    return total
