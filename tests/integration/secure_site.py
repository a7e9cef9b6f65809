"""Test helper: a running `edgesplit up --secure` stack and the attackers' tools.

`SecureSite.start` prepares a state folder (the default topology's workers and the
standard identities, plus a victim client ``alice`` and a hostile client ``mallory``),
runs `edgesplit up --secure` on it (its own Mosquitto with the secure profile: TLS with
client certificates, per-identity ACLs) and waits for "edgesplit ready". Attackers
connect with real identities of that folder over TLS (`raw_client`); an operator
subscriber on ``edgesplit/{cluster}/#`` (`Watch`) records what the broker delivered, so a
publish the ACL denied is shown to reach no one.

The broker makes each identity's username its client id (one session per identity and
listener), so the test's own connections use identities nothing else runs as: the
compromised worker is ``eve`` (a registered worker, trust 0, whose process the attacker
is), the watcher ``auditor`` and the status reader ``inspector`` (operator role; `up`
itself connects as ``operator``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
from aiomqtt.client import ProtocolVersion

from services.cli.client import ClientOptions, request
from services.cli.system import collect_status
from shared import codec
from shared.config import BusSettings
from shared.messages import GenerateRequest, Message, RequestFinished
from shared.model.pipeline import LocalPipeline
from shared.security.acl import Role
from shared.security.creds import StateDir, add_identity, client_environment, init_state
from shared.topology import load_topology
from tests.integration.test_secure_up import EDGESPLIT, _wait_for_line

VICTIM, ATTACKER, WORKER_ATTACKER = "alice", "mallory", "eve"
"""The client whose prompts are attacked, the hostile client, the compromised worker."""
WATCHER, INSPECTOR = "auditor", "inspector"
"""Operator-role identities of the test: the '#' watcher and the status reader."""
ROOT_DIR = Path(__file__).resolve().parents[2]


@dataclass
class Delivery:
    topic: str
    payload: bytes
    retain: bool


@dataclass
class Watch:
    """What an operator subscriber on the cluster's ``#`` received (it may read everything)."""

    seen: list[Delivery] = field(default_factory=list)

    def on(self, suffix: str) -> list[Delivery]:
        """Deliveries whose topic ends with ``suffix`` (e.g. ``/plan/current``)."""
        return [delivery for delivery in self.seen if delivery.topic.endswith(suffix)]

    def carrying(self, marker: bytes) -> list[Delivery]:
        """Deliveries whose payload contains ``marker`` (an attacker's tag)."""
        return [delivery for delivery in self.seen if marker in delivery.payload]


@dataclass
class SecureSite:
    root: Path
    cluster: str
    state: StateDir = field(init=False)
    url: str = ""
    process: subprocess.Popen[bytes] | None = None
    _expected: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state = StateDir(self.root / "state")

    # --- the stack ------------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(self.root / "models"), "EDGESPLIT_CLUSTER": self.cluster,
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        for key in [k for k in env if k.startswith(("EDGESPLIT_TLS", "EDGESPLIT_PLAN_SIGNING", "EDGESPLIT_CLIENT"))
                    or k == "EDGESPLIT_BROKER_URL"]:  # fmt: skip
            del env[key]
        return env

    def start(self, ready_timeout_s: float = 150.0) -> None:
        init_state(self.state.root, load_topology(ROOT_DIR / "deploy/topologies/default.toml"), cluster=self.cluster)
        add_identity(self.state.root, VICTIM, Role.CLIENT, trust=0)
        add_identity(self.state.root, ATTACKER, Role.CLIENT, trust=0)
        add_identity(self.state.root, WORKER_ATTACKER, Role.WORKER, trust=0)
        for name in (WATCHER, INSPECTOR):
            add_identity(self.state.root, name, Role.OPERATOR, trust=0)
        out = self.root / "up.out"
        self.process = subprocess.Popen(
            [*EDGESPLIT, "up", "--secure", "--state", str(self.state.root), "--model", "tiny-llama",
             "--run-dir", str(self.root / "run")],
            stdout=open(out, "wb"), stderr=open(self.root / "up.err", "wb"), env=self.environment(),  # noqa: SIM115
            start_new_session=True, cwd=ROOT_DIR,
        )  # fmt: skip
        ready = _wait_for_line(self.process, out, "edgesplit ready", ready_timeout_s)
        found = re.search(r"broker (mqtts://127\.0\.0\.1:\d+)", ready)
        assert found is not None, ready
        self.url = found.group(1)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log(self, name: str) -> str:
        """A process's log in the run folder (`up` writes one per worker and service)."""
        return (self.root / "run" / f"{name}.log").read_text(errors="replace")

    # --- identities -----------------------------------------------------------------------

    def settings(self, name: str) -> BusSettings:
        """Bus settings of identity ``name`` (its certificate; its name as client id)."""
        variables = client_environment(self.state, name, self.url)
        return BusSettings(broker_url=self.url, data_broker_url=variables["EDGESPLIT_DATA_BROKER_URL"],
                           cluster=self.cluster, client_id=name,
                           tls_ca_file=variables["EDGESPLIT_TLS_CA_FILE"],  # type: ignore[arg-type]
                           tls_cert_file=variables["EDGESPLIT_TLS_CERT_FILE"],  # type: ignore[arg-type]
                           tls_key_file=variables["EDGESPLIT_TLS_KEY_FILE"])  # type: ignore[arg-type]  # fmt: skip

    def tls(self, name: str) -> ssl.SSLContext:
        credentials = self.state.credentials(name)
        context = ssl.create_default_context(cafile=str(credentials.ca_file))
        context.load_cert_chain(credentials.cert_file, credentials.key_file)
        return context

    def raw_client(self, name: str, identifier: str | None = None, clean_start: bool = True,
                   data: bool = False) -> aiomqtt.Client:  # fmt: skip
        """A plain MQTT v5 client with ``name``'s certificate on the control listener (the
        data listener with ``data``); the broker makes ``name`` (the certificate's subject
        on the data listener) its username and its client id, whatever ``identifier`` asks."""
        port = int(self.url.rsplit(":", 1)[1]) + (1 if data else 0)
        return aiomqtt.Client("127.0.0.1", port, identifier=identifier or f"{name}-{secrets.token_hex(4)}",
                              tls_context=self.tls(name), protocol=ProtocolVersion.V5, timeout=5,
                              clean_start=clean_start)  # fmt: skip

    def topic(self, suffix: str) -> str:
        return f"edgesplit/{self.cluster}/{suffix}"

    async def publish(self, name: str, topic: str, payload: bytes | Message, retain: bool = False,
                      identifier: str | None = None) -> None:  # fmt: skip
        """Publish on ``topic`` (the full name) as identity ``name`` (QoS 1: the broker
        acknowledges, denied or not)."""
        origin = f"forger{secrets.token_hex(4)}"  # a fresh origin: no receiver takes it for a duplicate
        data = codec.encode(payload, origin=origin, seq=1) if isinstance(payload, Message) else payload
        async with self.raw_client(name, identifier) as client:
            await client.publish(topic, data, qos=1, retain=retain)

    @contextlib.asynccontextmanager
    async def watch(self, settle_s: float = 1.5) -> AsyncIterator[Watch]:
        """An operator on ``#`` for the block's duration (plus ``settle_s`` after it)."""
        watch = Watch()
        async with self.raw_client(WATCHER) as client:
            await client.subscribe(self.topic("#"), qos=1)

            async def collect() -> None:
                async for message in client.messages:
                    watch.seen.append(Delivery(str(message.topic), bytes(message.payload),  # type: ignore[arg-type]
                                               bool(message.retain)))  # fmt: skip

            task = asyncio.get_running_loop().create_task(collect())
            try:
                await asyncio.sleep(0.5)  # retained messages arrive first; the block sees fresh ones
                watch.seen.clear()
                yield watch
                await asyncio.sleep(settle_s)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # --- serving --------------------------------------------------------------------------

    def expected(self, prompt: Sequence[int], tokens: int) -> tuple[int, ...]:
        key = (*prompt, -1, tokens)
        if key not in self._expected:
            local = LocalPipeline(self.root / "models" / "tiny-llama", ())
            self._expected[key] = tuple(local.generate(list(prompt), tokens).token_ids)
        return self._expected[key]

    async def generate(self, prompt: Sequence[int], tokens: int = 6, timeout_s: float = 60.0,
                       as_client: str = VICTIM) -> RequestFinished:  # fmt: skip
        """One request as ``as_client`` through the client library."""

        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id=secrets.token_hex(8), reply_to=client,  # type: ignore[arg-type]
                                   token_ids=tuple(prompt), max_new_tokens=tokens, timeout_s=timeout_s)  # fmt: skip

        result = await request(ClientOptions(self.settings(as_client), timeout_s=timeout_s), make)
        assert isinstance(result, RequestFinished), result
        return result

    def assert_exact(self, prompt: Sequence[int] = (5, 17, 9), tokens: int = 6) -> None:
        """The stack still answers, with the unsplit model's greedy tokens."""
        result = asyncio.run(self.generate(prompt, tokens))
        assert tuple(result.token_ids) == self.expected(prompt, tokens), result

    def status(self, wait_s: float = 2.5) -> dict[str, Any]:
        """What `edgesplit status --json` prints, read by an operator identity."""
        return asyncio.run(collect_status(self.settings(INSPECTOR), wait_s))

    def wait_status(self, done: Any, timeout_s: float = 30.0) -> dict[str, Any]:
        """`status` until ``done(status)`` holds (or the deadline: the last one)."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self.status()
            if done(seen) or time.monotonic() > deadline:
                return seen
            time.sleep(0.5)
