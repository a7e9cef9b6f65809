"""Warm standby: a worker loads blocks into its shard cache ahead of any plan, the last
blocks first, within its limit, so a migration to it loads nothing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.worker.settings import WorkerSettings
from services.worker.shard_cache import CachedShards, warm_ahead
from shared.model.runtime import SegmentRuntime
from shared.model.shard import ShardStore, write_shards
from shared.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ShardStore:
    root = tmp_path_factory.mktemp("warm")
    write_tiny_checkpoint("llama", root / "ckpt", layers=6, seed=2)
    write_shards(root / "ckpt", root / "shards")
    return ShardStore(root / "shards")


def block_bytes(store: ShardStore, index: int) -> int:
    """A block's file size (the manifest's: what warm plans with; its tensors are a little less)."""
    return store.manifest.blocks[index].bytes


def test_warm_loads_the_last_blocks_first_within_the_limit_and_a_plan_then_loads_nothing(store: ShardStore) -> None:
    size = block_bytes(store, 0)
    cache = CachedShards(store, max_bytes=10 * size)
    assert cache.warm(limit_bytes=3 * size) == 3
    assert [cache.holds(i) for i in range(6)] == [False, False, False, True, True, True]
    loads = cache.loads
    SegmentRuntime(cache, 3, 6)  # a segment [3, 6) on this node: already in memory
    assert cache.loads == loads
    assert cache.warm(limit_bytes=3 * size) == 0  # full: nothing more


def test_warm_respects_the_cache_size_and_stops_when_asked(store: ShardStore) -> None:
    size = block_bytes(store, 0)
    assert CachedShards(store, max_bytes=2 * size).warm(limit_bytes=100 * size) == 2
    stop = threading.Event()
    stop.set()
    assert CachedShards(store, max_bytes=100 * size).warm(limit_bytes=100 * size, stop=stop) == 0


@pytest.mark.parametrize(("warm_bytes", "expected"), [(None, 2), (0, 0), (1, 0)])
def test_a_worker_warms_half_its_memory_unless_told_otherwise(store: ShardStore, warm_bytes: int | None,
                                                             expected: int) -> None:  # fmt: skip
    size = block_bytes(store, 0)
    settings = WorkerSettings(node_id="a", shards_dir=store.shard_dir, memory_bytes=4 * size + 1,
                              warm_shard_bytes=warm_bytes)  # fmt: skip
    cache = CachedShards(store, max_bytes=100 * size)
    asyncio.run(warm_ahead(cache, settings))
    assert sum(cache.holds(i) for i in range(6)) == expected
