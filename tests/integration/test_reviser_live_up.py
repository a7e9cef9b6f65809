"""Issue acceptance: the split reviser answers a request built from the live profile of
`edgesplit up` (the monitor's retained CapacityProfile), and its plan equals
`edgesplit plan` on the same problem written to a file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.broker import free_port
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import CapacityProfile, PlanProposed, PlanRequested, PrivacyPolicy
from shared.model.shard import ShardStore
from shared.planning.live import problem_from_profile, problem_to_json
from shared.topics import CAPACITY, REVISER_REPLIES, REVISER_REQUESTS
from shared.topology import load_topology

pytestmark = pytest.mark.integration
EDGESPLIT = [sys.executable, "-m", "services.cli"]


def _wait_for(path: Path, text: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        assert process.poll() is None, path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout_s} s")


async def _ask(settings: BusSettings, shards: Path, policy: PrivacyPolicy) -> tuple[CapacityProfile, PlanProposed]:
    async with Bus(settings) as bus:
        async with bus.subscribe(CAPACITY) as profiles:
            async with asyncio.timeout(30):
                while True:  # a profile in which every node is alive and measured
                    _, profile = await profiles.get()
                    if len(profile.nodes) == 3 and all(n.alive and n.flops_per_s > 0 for n in profile.nodes):
                        break
        manifest = ShardStore(shards).manifest
        request = PlanRequested(
            request_id="live1", reply_to=bus.origin, model_id=manifest.model_name[:1024],  # type: ignore[arg-type]
            source="car", profile=profile, privacy=policy, alternatives=3,  # type: ignore[arg-type]
        )  # fmt: skip
        async with bus.subscribe(REVISER_REPLIES, client=bus.origin) as replies:
            await bus.publish(REVISER_REQUESTS, request)
            async with asyncio.timeout(30):
                while True:
                    _, proposal = await replies.get()
                    if proposal.request_id == "live1":
                        return profile, proposal


def test_reviser_on_the_live_up_profile_equals_edgesplit_plan(tmp_path: Path) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    models = tmp_path / "models"
    env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(models), "EDGESPLIT_CLUSTER": "liveplan"}
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        up = subprocess.Popen([*EDGESPLIT, "up", "--model", "tiny-llama", "--broker", url,
                               "--run-dir", str(tmp_path / "run")],
                              stdout=stdout, stderr=stderr, env=env, start_new_session=True)  # fmt: skip
    try:
        _wait_for(out, "edgesplit ready", up, 120)
        topology = load_topology()
        policy = PrivacyPolicy(trusted_level=topology.trusted_level, private_blocks=topology.private_blocks)
        settings = BusSettings(broker_url=url, cluster="liveplan")
        shards = models / "tiny-llama-shards"
        profile, proposal = asyncio.run(_ask(settings, shards, policy))
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
    assert proposal.feasible and proposal.best is not None, proposal
    problem = problem_from_profile(profile, ShardStore(shards).manifest, policy, source="car")
    problem_file = tmp_path / "live-problem.json"
    problem_file.write_text(json.dumps(problem_to_json(problem)))
    planned = subprocess.run([*EDGESPLIT, "plan", str(problem_file), "--json"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    want = json.loads(planned.stdout.splitlines()[-1])
    got = [{"node": s.node, "start": s.start, "end": s.end} for s in proposal.best.segments]
    assert got == want["segments"]
    assert proposal.best.latency_s == pytest.approx(want["predicted"]["latency_s"], rel=1e-9)
    assert proposal.best.bottleneck_s == pytest.approx(want["predicted"]["bottleneck_s"], rel=1e-9)
    assert all(s.start >= topology.private_blocks or s.node == "car" for s in proposal.best.segments)
