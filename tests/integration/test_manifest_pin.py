"""A worker given another checkpoint's shards refuses a plan pinned to the served manifest."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared.broker import LocalBroker
from shared.model.shard import write_shards
from shared.model.shard_files import ShardFiles
from shared.model.tiny import write_tiny_checkpoint
from tests.integration.cluster import (
    TEST_SIGNING_KEY,
    WorkerCluster,
    make_plan,
    publish_plan,
    settings_for,
    two_phase,
    wait_online,
)

pytestmark = pytest.mark.integration


def test_worker_with_another_checkpoints_shards_refuses_the_pinned_plan(broker: LocalBroker, tmp_path: Path) -> None:
    write_shards(write_tiny_checkpoint("llama", tmp_path / "a", layers=4, seed=1), tmp_path / "sa")
    write_shards(write_tiny_checkpoint("llama", tmp_path / "b", layers=4, seed=2), tmp_path / "sb")
    pin = ShardFiles(tmp_path / "sa").manifest_sha256
    foreign = ShardFiles(tmp_path / "sb").manifest_sha256
    settings = settings_for(broker.url, "pin" + tmp_path.name[-6:].replace("_", ""))
    quiet = {"EDGESPLIT_BENCHMARK": "false", "EDGESPLIT_PROBE_PERIOD_S": "0"}
    good = WorkerCluster(broker.url, settings.cluster, tmp_path / "sa", tmp_path, extra_env=quiet)
    stray = WorkerCluster(broker.url, settings.cluster, tmp_path / "sb", tmp_path, extra_env=quiet)
    try:
        good.start("car")
        stray.start("mec")
        # The retained plan (no race with the workers' subscriptions): mec refuses it.
        plan = make_plan(1, "car", (("car", 0, 2), ("mec", 2, 4)), TEST_SIGNING_KEY, manifest_sha256=pin)
        assert asyncio.run(publish_plan(settings, plan, timeout_s=60)) == {"mec"}
        assert f"sha256 {foreign} does not match the plan's {pin}" in stray.log_tail("mec", 50)
        # Through PREPARE too, with the reason in the NACK.
        asyncio.run(wait_online(settings, ("car", "mec")))
        plan = make_plan(2, "car", (("car", 0, 2), ("mec", 2, 4)), TEST_SIGNING_KEY, manifest_sha256=pin)
        answers = asyncio.run(two_phase(settings, plan, timeout_s=60))
        assert answers["car"] == "ready"
        assert f"sha256 {foreign} does not match the plan's {pin}" in answers["mec"], answers
        # The same workers take a plan that keeps the stray node out.
        alone = make_plan(3, "car", (("car", 0, 4),), TEST_SIGNING_KEY, manifest_sha256=pin)
        assert not asyncio.run(publish_plan(settings, alone, timeout_s=60))
    finally:
        good.stop()
        stray.stop()
