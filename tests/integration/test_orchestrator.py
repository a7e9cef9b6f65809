"""The adaptive orchestrator end to end: `edgesplit up` (all four control services and
three workers on a real broker) plans from the live profile; a privacy change re-plans."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.broker import free_port
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import DecisionRecorded, Plan, PrivacyPolicy, PrivacyPolicySet
from shared.topics import DECISIONS, PLAN, POLICY

ROOT = Path(__file__).resolve().parents[2]
# The car (entry, trusted) is 50x slower than the others, so the best plan keeps only the
# private blocks on it and moves the rest to a fast node: compute dominates the hops. The
# first plan waits until every node and every link between them is measured (a link not
# probed yet is unusable, which made the car alone the only plan: car[0,6)).
TOPOLOGY = """
name = "orchestrator-test"
private_blocks = 2
trusted_level = 2
[[nodes]]
id = "car"
trust = 2
memory_bytes = 4e8
speed = 0.02
entry = true
[[nodes]]
id = "rsu"
trust = 1
memory_bytes = 8e8
[[nodes]]
id = "mec"
trust = 0
memory_bytes = 2e9
"""


def _wait_for_line(process: subprocess.Popen[bytes], out: Path, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():
            if text in line:
                return line
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout_s} s; output: {out.read_text()[-2000:]}")


async def _change_policy_and_wait(settings: BusSettings, private_blocks: int,
                                  timeout_s: float) -> tuple[Plan, list[DecisionRecorded]]:  # fmt: skip
    """Publish a stricter policy; the plan the orchestrator rolls out in answer."""
    async with Bus(settings) as bus, bus.subscribe(PLAN) as plans, bus.subscribe(DECISIONS) as records:
        _, first = await plans.get()
        await bus.publish(POLICY, PrivacyPolicySet(policy=PrivacyPolicy(private_blocks=private_blocks, trusted_level=2)))
        async with asyncio.timeout(timeout_s):
            while True:
                _, plan = await plans.get()
                if plan.epoch > first.epoch:
                    break
        seen: list[DecisionRecorded] = []
        while True:
            try:
                async with asyncio.timeout(1.0):
                    seen.append((await records.get()).message)
            except TimeoutError:
                return plan, seen


@pytest.mark.timeout(240)
def test_up_plans_from_the_live_profile_and_a_policy_change_replans(tmp_path: Path) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text(TOPOLOGY)
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(tmp_path / "models"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    out = tmp_path / "up.out"
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--model", "tiny-llama", "--broker", url,
         "--cluster", "orch", "--topology", str(topology), "--run-dir", str(tmp_path / "run")],
        stdout=open(out, "wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,  # noqa: SIM115
        start_new_session=True,
    )  # fmt: skip
    try:
        ready = _wait_for_line(up, out, "edgesplit ready", 150)
        first = re.search(r"epoch (\d+): (.*); broker", ready)
        assert first is not None
        layout = first.group(2)
        assert re.match(r"car\[0,2\) (rsu|mec)\[2,6\)$", layout), layout  # private blocks on car only
        settings = BusSettings(broker_url=url, cluster="orch",  # type: ignore[arg-type]
                               models_dir=tmp_path / "models")  # finds `up`'s key for this broker  # fmt: skip
        began = time.monotonic()
        plan, seen = asyncio.run(_change_policy_and_wait(settings, 4, 60))
        replan_s = time.monotonic() - began
        assert plan.segments[0].node == "car" and plan.segments[0].end >= 4, plan.segments
        policy = [d for d in seen if d.trigger.startswith("policy_changed") and d.outcome == "committed"]
        assert policy, [(d.decision_id, d.trigger, d.outcome, d.reason) for d in seen]
        assert policy[-1].emergency and policy[-1].action == "resplit"
        assert policy[-1].to_epoch == plan.epoch and policy[-1].chosen is not None
        assert replan_s < 30
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
