"""Recently used block weights kept in memory, so a boundary move between nodes that
already hold the weights costs no load (and no sha256 pass)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from shared.model.config import ModelConfig
from shared.model.shard import ShardStore


class CachedShards:
    """A TensorSource over a ShardStore that keeps loaded blocks, least recently used
    first out, up to ``max_bytes`` (blocks in use by a segment stay referenced by it)."""

    def __init__(self, store: ShardStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.loads = 0
        """Blocks read from the store so far (each verified against the manifest)."""
        self._blocks: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes: dict[int, int] = {}
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
            return index in self._blocks

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        with self._lock:
            cached = self._blocks.get(index)
            if cached is not None:
                self._blocks.move_to_end(index)
                return cached
        tensors = self.store.block_tensors(index)  # verifies sha256; outside the lock
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            self.loads += 1
            self._blocks[index] = tensors
            self._bytes[index] = size
            while sum(self._bytes.values()) > self.max_bytes and len(self._blocks) > 1:
                oldest, _ = self._blocks.popitem(last=False)
                del self._bytes[oldest]
        return tensors
