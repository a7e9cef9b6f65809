"""`edgesplit emulate` against a real Mosquitto and one real worker process.

The worker's own retained `EmulationApplied` (and its log) is the evidence of what it
applies; readiness comes from that retained state, never from sleeps.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from services.cli import main
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.messages import EmulatedLink, EmulationApplied
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.topics import EMULATION_STATE
from tests.integration.cluster import TEST_SIGNING_KEY, WorkerCluster, settings_for

pytestmark = pytest.mark.integration
WORKER_START_S = 60.0
"""Deadline for a worker process to come up (imports torch) on a busy 2-core machine."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("emulate-model")
    write_tiny_checkpoint("llama", folder / "model", layers=2, seed=0)
    write_shards(folder / "model", folder / "shards")
    return folder / "shards"


def retained_state(
    broker: LocalBroker, cluster: str, node: str, timeout_s: float
) -> EmulationApplied:
    """The node's retained emulation state, read by a client of the test's own."""

    async def read() -> EmulationApplied:
        async with Bus(settings_for(broker.url, cluster)) as bus:
            async with bus.subscribe(EMULATION_STATE, node=node) as states:
                async with asyncio.timeout(timeout_s):
                    return (await states.get()).message

    return asyncio.run(read())


def test_emulate_changes_what_a_running_worker_applies(
    broker: LocalBroker, cluster: str, shards: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("EDGESPLIT_PLAN_SIGNING_KEY", TEST_SIGNING_KEY)  # the workers' control key
    workers = WorkerCluster(broker.url, cluster, shards, tmp_path)
    common = ["--broker", broker.url, "--cluster", cluster]
    try:
        workers.start("car", "--slowdown", "2", "--links", json.dumps({"mec": [2.5e6, 0.01]}))
        start = retained_state(broker, cluster, "car", WORKER_START_S)
        assert start.command_id == 0 and start.slowdown == 2.0

        # cut car -> mec to a tenth, keeping its latency, and a 4x load spike
        code = main(["emulate", "car", "--link", "mec:250k", "--slowdown", "4", "--json", *common])
        out, err = capsys.readouterr()
        assert code == 0, err
        answer = json.loads(out)
        assert answer["command_id"] == 1 and answer["slowdown"] == 4.0
        assert answer["links"] == [
            {"dst": "mec", "bandwidth_bytes_per_s": 250e3, "latency_s": 0.01}
        ]

        code = main(["emulate", "car", "--unshape", "mec", "--link", "rsu:1M:5ms", "--slowdown", "1",
                     *common])  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out == "car: slowdown 1x; links: mec unshaped, rsu 1 MB/s + 5 ms (command 2)\n"

        state = retained_state(broker, cluster, "car", 5.0)
        assert state.command_id == 2 and state.slowdown == 1.0 and state.noise == 0.0
        assert state.links == (
            EmulatedLink(dst="mec", bandwidth_bytes_per_s=None, latency_s=0.0),  # type: ignore[arg-type]
            EmulatedLink(dst="rsu", bandwidth_bytes_per_s=1e6, latency_s=0.005),  # type: ignore[arg-type]
        )
        log = workers.log_tail("car", 200)
        assert "emulation 1: slowdown 4.00" in log and "emulation 2: slowdown 1.00" in log
    finally:
        workers.stop()

    # the worker is gone but its retained state stays: nobody confirms
    code = main(["emulate", "car", "--slowdown", "3", "--timeout", "1", *common])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "node car did not confirm emulation command 3" in err and "may not be running" in err


def test_emulate_a_node_that_never_ran_is_one_line(
    broker: LocalBroker, cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["emulate", "ghost", "--slowdown", "2", "--timeout", "0.5",
                 "--broker", broker.url, "--cluster", cluster])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "node ghost has published no emulation state" in err and cluster in err
