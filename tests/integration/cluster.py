"""Test helper: real worker processes on a real broker, with a signed static plan."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import EpochReady, EpochRejected, Plan, Segment
from shared.topics import EPOCH_ACKS, PLAN

ROOT = Path(__file__).resolve().parents[2]
DEVICE_ENV = "EDGESPLIT_TEST_DEVICE"
"""Set to a torch device (``cuda``) to run the test workers there; unset, workers use their
default (cpu). In-process reference runs stay on the CPU either way."""


TEST_SIGNING_KEY = secrets.token_hex(16)
"""The control key of every process the test helpers start (no public default key)."""
KEY_ENV = {"EDGESPLIT_PLAN_SIGNING_KEY": TEST_SIGNING_KEY}


class _Startable(Protocol):
    workers: WorkerCluster

    def start(self) -> None: ...


S = TypeVar("S", bound=_Startable)


def started(system: S) -> Iterator[S]:
    """A module fixture's body: torch on one thread (the in-process references), start
    ``system``, yield it, and stop its workers whatever happens."""
    import torch

    torch.set_num_threads(1)
    try:
        system.start()
        yield system
    finally:
        system.workers.stop()


def stop_up(up: subprocess.Popen[bytes]) -> None:
    """Stop an `edgesplit up` process as a user would (Ctrl-C, SIGINT to it alone); kill its
    process group if it has not stopped within 30 s, and fail the test then."""
    up.send_signal(signal.SIGINT)
    try:
        up.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        raise


def settings_for(broker_url: str, cluster: str, **extra: object) -> BusSettings:
    """Settings of a test's own clients: the helpers' control key unless ``extra`` says."""
    extra.setdefault("plan_signing_key", TEST_SIGNING_KEY)
    return BusSettings(broker_url=broker_url, cluster=cluster, **extra)  # type: ignore[arg-type]


def make_plan(epoch: int, entry: str, segments: Sequence[tuple[str, int, int]], key: str,
              model_id: str = "test", manifest_sha256: str = "") -> Plan:  # fmt: skip
    return Plan(
        epoch=epoch, model_id=model_id, entry_node=entry,  # type: ignore[arg-type]
        segments=tuple(Segment(node=n, start=s, end=e) for n, s, e in segments),  # type: ignore[arg-type]
        manifest_sha256=manifest_sha256,
    ).sign(key)


@dataclass
class WorkerCluster:
    """Worker processes started with `python -m services.worker`; stop() kills them all."""

    broker_url: str
    cluster: str
    shards: Path
    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, node: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **KEY_ENV, **self.extra_env}
        device = ("--device", os.environ[DEVICE_ENV]) if os.environ.get(DEVICE_ENV) else ()
        log = open(self.log_dir / f"{node}.log", "ab")  # noqa: SIM115 - handed to the process
        process = subprocess.Popen(
            [sys.executable, "-m", "services.worker", "--node-id", node,
             *(() if "--shards-url" in args else ("--shards", str(self.shards))),
             "--broker", self.broker_url, "--cluster", self.cluster, "--threads", "1", *device,
             *args],
            stdout=log, stderr=log, cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.processes[node] = process
        return process

    def log_tail(self, node: str, lines: int = 20) -> str:
        text = (self.log_dir / f"{node}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, node: str, sig: int) -> None:
        self.processes[node].send_signal(sig)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


async def publish_plan(settings: BusSettings, plan: Plan, timeout_s: float = 60.0) -> set[str]:
    """Publish ``plan`` retained and wait until every node in it acknowledges READY.

    Returns the nodes that rejected it (empty when all are ready).
    """
    waiting = {plan.entry_node, *(segment.node for segment in plan.segments)}
    rejected: set[str] = set()
    async with Bus(settings) as bus, bus.subscribe(EPOCH_ACKS) as acks:
        await bus.publish(PLAN, plan)
        async with asyncio.timeout(timeout_s):
            while waiting:
                _, ack = await acks.get()
                if ack.epoch != plan.epoch:
                    continue
                waiting.discard(ack.node)
                if isinstance(ack, EpochRejected):
                    rejected.add(ack.node)
                assert isinstance(ack, EpochReady | EpochRejected)
    return rejected


async def two_phase(settings: BusSettings, plan: Plan, timeout_s: float = 60.0) -> dict[str, str]:
    """Drive PREPARE -> READY -> PLAN + COMMIT by hand (what the broadcaster does), for
    testing the worker side. Returns node -> "ready" or the NACK reason; commits only when
    every node is ready, else publishes ABORT."""
    from shared.messages import AbortEpoch, CommitEpoch, PrepareEpoch
    from shared.topics import EPOCH_COMMANDS

    waiting = {plan.entry_node, *(segment.node for segment in plan.segments)}
    answers: dict[str, str] = {}
    async with Bus(settings) as bus, bus.subscribe(EPOCH_ACKS) as acks:
        await bus.publish(EPOCH_COMMANDS, PrepareEpoch(epoch=plan.epoch, plan=plan))
        async with asyncio.timeout(timeout_s):
            while set(answers) < waiting:
                _, ack = await acks.get()
                if ack.epoch == plan.epoch and ack.node in waiting:
                    answers[ack.node] = "ready" if isinstance(ack, EpochReady) else ack.reason
        if all(answer == "ready" for answer in answers.values()):
            await bus.publish(PLAN, plan)
            await bus.publish(EPOCH_COMMANDS, CommitEpoch(epoch=plan.epoch))
        else:
            await bus.publish(EPOCH_COMMANDS, AbortEpoch(epoch=plan.epoch, reason="a node refused"))
    return answers


async def wait_online(settings: BusSettings, nodes: Sequence[str], timeout_s: float = 60.0) -> None:
    """Wait until every one of ``nodes`` has its retained status online (subscribed and
    serving control topics); TimeoutError after ``timeout_s``."""
    from shared.topics import NODE_STATUS

    waiting = set(nodes)
    async with Bus(settings) as bus, bus.subscribe(NODE_STATUS) as statuses, asyncio.timeout(timeout_s):
        while waiting:
            _, status = await statuses.get()
            if status.state == "online":
                waiting.discard(status.node)
