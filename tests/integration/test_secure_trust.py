"""Trust from identity and the control key on the secure stack (`edgesplit up --secure`).

A compromised worker (``eve``, a worker identity of the state folder with registry trust
0, whose process the attacker is: the broker gives each identity one session, so nobody
can run beside mec as mec) claims trust 10 in its status and tries to publish a plan
moving every block onto itself. The ACL drops the plan (no worker ever sees it: nothing
is even refused), the monitor and the orchestrator keep eve at the registry's trust 0
(`edgesplit status` shows "claims 10"), the monitor counts the ignored claim, and a
client still gets the tokens of the unsplit model.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from shared import codec
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import NodeStatus, Plan, Segment
from shared.model.pipeline import LocalPipeline
from shared.security.acl import Role
from shared.security.creds import StateDir, add_identity, client_environment, init_state
from shared.topics import NODE_STATUS, PLAN
from shared.topology import load_topology
from tests.integration.cluster import stop_up
from tests.integration.secure_site import ROOT_DIR
from tests.integration.test_secure_up import EDGESPLIT, _wait_for_line

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
PROMPT = [5, 17, 9]


ATTACKER = "eve"


def settings_of(state: Path, name: str, url: str) -> BusSettings:
    variables = client_environment(StateDir(state), name, url)
    return BusSettings(broker_url=url, data_broker_url=variables["EDGESPLIT_DATA_BROKER_URL"], cluster="sectrust",
                       tls_ca_file=variables["EDGESPLIT_TLS_CA_FILE"],  # type: ignore[arg-type]
                       tls_cert_file=variables["EDGESPLIT_TLS_CERT_FILE"],  # type: ignore[arg-type]
                       tls_key_file=variables["EDGESPLIT_TLS_KEY_FILE"])  # type: ignore[arg-type]  # fmt: skip


async def compromised_worker(state: Path, url: str) -> None:
    """eve announces itself like mec (memory for no block: the claim is tested, not a ghost
    node), claiming trust 10, then publishes a plan putting everything on itself."""
    async with Bus(settings_of(state, ATTACKER, url), origin=ATTACKER) as bus:
        async with bus.subscribe(NODE_STATUS, node="mec") as statuses, asyncio.timeout(10):
            real: NodeStatus = (await statuses.get()).message
        claim = real.model_copy(update={"node": ATTACKER, "trust": 10, "memory_bytes": 1, "segments": (), "epoch": None})
        await bus.publish(NODE_STATUS, claim, node=ATTACKER)
        forged = Plan(epoch=1_000, model_id="tiny-llama", entry_node=ATTACKER,  # type: ignore[arg-type]
                      segments=(Segment(node=ATTACKER, start=0, end=4),), signature="00" * 32)  # type: ignore[arg-type]  # fmt: skip
        payload = codec.encode(forged, origin=bus.origin, seq=1)
        await bus.connection("control").publish(PLAN.topic(bus.cluster), payload, PLAN.qos, True)


def status(env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run([*EDGESPLIT, "status", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def test_a_compromised_worker_can_neither_raise_its_trust_nor_publish_a_plan(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init_state(state, load_topology(ROOT_DIR / "deploy/topologies/default.toml"), cluster="sectrust")
    add_identity(state, ATTACKER, Role.WORKER, trust=0)
    add_identity(state, "inspector", Role.OPERATOR, trust=0)  # `up` holds the operator's sessions
    env = {**os.environ, "EDGESPLIT_MODELS_DIR": str(tmp_path / "models"), "EDGESPLIT_CLUSTER": "sectrust"}
    for key in [k for k in env if k.startswith(("EDGESPLIT_TLS", "EDGESPLIT_PLAN_SIGNING")) or k == "EDGESPLIT_BROKER_URL"]:
        del env[key]
    up = subprocess.Popen(
        [*EDGESPLIT, "up", "--secure", "--state", str(state), "--model", "tiny-llama", "--run-dir", str(tmp_path / "run")],
        stdout=open(tmp_path / "up.out", "wb"), stderr=open(tmp_path / "up.err", "wb"), env=env,  # noqa: SIM115
        start_new_session=True,
    )  # fmt: skip
    try:
        ready = _wait_for_line(up, tmp_path / "up.out", "edgesplit ready", 150)
        found = re.search(r"broker (mqtts://127\.0\.0\.1:\d+)", ready)
        assert found is not None, ready
        url = found.group(1)
        key_file = state / "signing.key"  # no default key: one per state folder, 0600
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_text().strip()) == 64
        before = status({**env, **client_environment(StateDir(state), "inspector", url)})["plan"]

        asyncio.run(compromised_worker(state, url))
        operator = {**env, **client_environment(StateDir(state), "inspector", url)}
        deadline = time.monotonic() + 30
        while True:  # the claim reaches the monitor; its profile keeps the registry's trust
            seen = status(operator)
            claimed = {n["node"]: n["trust"] for n in seen["nodes"]}
            measured = {name: n["trust"] for name, n in seen["measured"].items()}
            ignored = seen["refused"].get("monitor", {}).get("NodeStatus_trust_ignored", 0)
            if (claimed.get(ATTACKER) == 10 and ignored >= 1) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert claimed[ATTACKER] == 10 and measured[ATTACKER] == 0 and ignored >= 1, seen
        assert seen["plan"] == before  # the ACL dropped the forged plan: it never arrived
        assert all("Plan_forged" not in n["refused"] for n in seen["nodes"])  # nobody even saw it
        placed = {s["node"]: (s["start"], s["end"]) for s in seen["plan"]["segments"]}
        assert seen["plan"]["entry_node"] == "car" and placed["car"][0] == 0  # private blocks stay

        client = {**env, **client_environment(StateDir(state), "client", url)}
        generated = subprocess.run(
            [*EDGESPLIT, "generate", "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6",
             "--json"],
            capture_output=True, text=True, timeout=60, env=client,
        )  # fmt: skip
        assert generated.returncode == 0, generated.stderr
        token_ids = json.loads(generated.stdout.splitlines()[-1])["token_ids"]
        unsplit = LocalPipeline(tmp_path / "models" / "tiny-llama", ()).generate(PROMPT, 6).token_ids
        assert token_ids == list(unsplit)  # the unsplit model's tokens
    finally:
        stop_up(up)
