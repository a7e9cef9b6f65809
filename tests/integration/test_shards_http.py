"""Workers that load their shards over HTTP (`edgesplit serve-shards`) serve the same
tokens as the unsplit model, and refuse a tampered file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from services.cli.client import ClientOptions, request
from services.cli.serve_shards import ShardServer
from shared.broker import LocalBroker
from shared.messages import GenerateRequest, RequestFinished
from shared.model.pipeline import LocalPipeline
from shared.model.shard import write_shards
from shared.model.shard_files import ShardFiles
from shared.model.tiny import write_tiny_checkpoint
from tests.integration.cluster import (
    TEST_SIGNING_KEY,
    WorkerCluster,
    make_plan,
    publish_plan,
    settings_for,
)

pytestmark = pytest.mark.integration

QUIET = {"EDGESPLIT_PROBE_PERIOD_S": "0"}


def _generate(settings: object, prompt: list[int], tokens: int) -> RequestFinished:
    def make(client: str) -> GenerateRequest:
        return GenerateRequest(request_id="h1", reply_to=client, token_ids=tuple(prompt),  # type: ignore[arg-type]
                               max_new_tokens=tokens)  # fmt: skip
    result = asyncio.run(request(ClientOptions(settings, timeout_s=60), make))  # type: ignore[arg-type]
    assert isinstance(result, RequestFinished), result
    return result


def test_workers_loading_shards_over_http_match_the_local_model(broker: LocalBroker, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = write_tiny_checkpoint("llama", tmp_path / "model", layers=4, seed=11)
    write_shards(model, tmp_path / "shards")
    pin = ShardFiles(tmp_path / "shards").manifest_sha256
    server = ShardServer(tmp_path / "shards")
    url = server.start()
    settings = settings_for(broker.url, "http" + tmp_path.name[-6:].replace("_", ""))
    caches = {node: tmp_path / f"cache-{node}" for node in ("car", "mec")}
    clusters = {node: WorkerCluster(broker.url, settings.cluster, tmp_path / "unused", tmp_path,
                                    extra_env={**QUIET, "EDGESPLIT_SHARD_CACHE_DIR": str(cache)})
                for node, cache in caches.items()}  # fmt: skip
    try:
        for node, cluster in clusters.items():
            cluster.start(node, "--shards-url", url)
        plan = make_plan(1, "car", (("car", 0, 2), ("mec", 2, 4)), TEST_SIGNING_KEY, manifest_sha256=pin)
        assert not asyncio.run(publish_plan(settings, plan, timeout_s=90))
        prompt = [5, 17, 99, 3]
        assert _generate(settings, prompt, 24).token_ids == LocalPipeline(model, ()).generate(prompt, 24).token_ids
        for node, cache in caches.items():
            held = {p.name for p in (cache / pin).iterdir()}
            assert "manifest.json" in held and not any(n.endswith(".part") for n in held), (node, held)
        assert {"entry.safetensors", "tokenizer.json", "block-000.safetensors"} <= {p.name for p in (caches["car"] / pin).iterdir()}
        assert "block-003.safetensors" in {p.name for p in (caches["mec"] / pin).iterdir()}
    finally:
        for cluster in clusters.values():
            cluster.stop()
        server.close()


def test_a_worker_refuses_a_tampered_shard_served_over_http(broker: LocalBroker, tmp_path: Path) -> None:
    model = write_tiny_checkpoint("llama", tmp_path / "model", layers=4, seed=12)
    write_shards(model, tmp_path / "shards")
    pin = ShardFiles(tmp_path / "shards").manifest_sha256
    block = tmp_path / "shards" / "block-003.safetensors"
    data = bytearray(block.read_bytes())
    data[-40] ^= 0x01
    block.write_bytes(bytes(data))
    server = ShardServer(tmp_path / "shards")
    url = server.start()
    settings = settings_for(broker.url, "tamp" + tmp_path.name[-6:].replace("_", ""))
    cluster = WorkerCluster(broker.url, settings.cluster, tmp_path / "unused", tmp_path,
                            extra_env={**QUIET, "EDGESPLIT_BENCHMARK": "false",
                                       "EDGESPLIT_SHARD_CACHE_DIR": str(tmp_path / "cache")})  # fmt: skip
    try:
        cluster.start("car", "--shards-url", url)
        cluster.start("mec", "--shards-url", url)
        plan = make_plan(1, "car", (("car", 0, 2), ("mec", 2, 4)), TEST_SIGNING_KEY, manifest_sha256=pin)
        assert asyncio.run(publish_plan(settings, plan, timeout_s=90)) == {"mec"}
        assert "block-003.safetensors from http" in cluster.log_tail("mec", 50)
        assert not (tmp_path / "cache" / pin / "block-003.safetensors").exists()
    finally:
        cluster.stop()
        server.close()
