"""Recently used block weights kept in memory, so a boundary move between nodes that
already hold the weights costs no load (and no sha256 pass).

The cache keeps blocks as the segment runs them (``loaded_block``: fp32 tensors and
linear weights, quantised kernels included), so a segment and the cache share one copy:
an int8 block is held once, packed, not once as stored and once packed."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shared.model.config import ModelConfig
from shared.model.quant import Weight, weight_bytes
from shared.model.shard import ShardStore

if TYPE_CHECKING:
    from services.worker.settings import WorkerSettings

log = logging.getLogger(__name__)
LoadedBlock = tuple[dict[str, torch.Tensor], dict[str, Weight]]


class CachedShards:
    """A TensorSource over a ShardStore that keeps loaded blocks, least recently used
    first out, up to ``max_bytes`` (blocks in use by a segment stay referenced by it)."""

    def __init__(self, store: ShardStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.loaded_bytes = 0
        """Bytes of block weights loaded into memory since start (warming included)."""
        self.loads = 0
        """Blocks read from the store so far (each verified against the manifest)."""
        self._blocks: OrderedDict[tuple[int, str], LoadedBlock] = OrderedDict()
        self._bytes: dict[tuple[int, str], int] = {}
        self._lock = threading.Lock()

    @property
    def config(self) -> ModelConfig:
        return self.store.config

    @property
    def weight_precision(self) -> str:
        """How the store keeps linear weights (the manifest's ``weights``)."""
        return self.store.weight_precision

    @property
    def tokenizer_path(self) -> Path:
        return self.store.tokenizer_path

    def entry_tensors(self) -> dict[str, torch.Tensor]:
        return self.store.entry_tensors()

    def holds(self, index: int) -> bool:
        with self._lock:
            return any(key[0] == index for key in self._blocks)

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index`` as stored (not cached: segments load through ``loaded_block``)."""
        return self.store.block_tensors(index)

    def loaded_block(
        self, index: int, precision: str, load: Callable[[dict[str, torch.Tensor]], LoadedBlock]
    ) -> LoadedBlock:
        """Block ``index`` as a segment runs it at ``precision``: cached, or ``load`` applied
        to the stored tensors (verified against the manifest) and kept."""
        key = (index, precision)
        with self._lock:
            cached = self._blocks.get(key)
            if cached is not None:
                self._blocks.move_to_end(key)
                return cached
        loaded = load(self.store.block_tensors(index))  # verifies sha256; outside the lock
        size = weight_bytes({**loaded[0], **loaded[1]})
        with self._lock:
            self.loads += 1
            self.loaded_bytes += size
            self._blocks[key] = loaded
            self._bytes[key] = size
            while sum(self._bytes.values()) > self.max_bytes and len(self._blocks) > 1:
                oldest, _ = self._blocks.popitem(last=False)
                del self._bytes[oldest]
        return loaded

    def warm(self, limit_bytes: int, stop: threading.Event | None = None, device: str = "cpu") -> int:
        """Load blocks ahead of any plan, the last block first (the early blocks are the
        private ones a semi-trusted node never hosts), while the cache holds under
        ``limit_bytes`` (and ``max_bytes``): a later migration to this node then costs no
        disk read or sha256 pass. Stops early when ``stop`` is set. Returns blocks loaded."""
        from shared.model.runtime import SegmentRuntime  # the same load path as a segment's

        loaded = 0
        for index in reversed(range(self.store.config.num_layers)):
            if stop is not None and stop.is_set():
                break
            with self._lock:
                held = sum(self._bytes.values())
                per_block = max(self._bytes.values(), default=self.store.manifest.blocks[index].bytes)
            if held + per_block > min(limit_bytes, self.max_bytes):
                break
            if not self.holds(index):
                SegmentRuntime(self, index, index + 1, device=device)  # kept by loaded_block
                loaded += 1
        return loaded


async def warm_ahead(shards: CachedShards, settings: WorkerSettings) -> None:
    """Load blocks into the shard cache ahead of any plan (a thread of its own, not the
    compute thread), within ``warm_shard_bytes`` (default half the node's memory); a
    failure only costs the warm-up: the blocks load again when a plan needs them."""
    limit = settings.warm_shard_bytes
    limit = settings.memory_bytes // 2 if limit is None else limit
    if limit <= 0:
        return
    stop = threading.Event()
    try:
        loaded = await asyncio.to_thread(shards.warm, limit, stop, settings.device)
        log.info("%s: %d blocks loaded ahead into the shard cache", settings.node_id, loaded)
    except asyncio.CancelledError:
        stop.set()
        raise
    except Exception as error:
        log.warning("%s: shard warm-up stopped: %s: %s", settings.node_id, type(error).__name__, error)

