"""The worker's compute side: loaded segments, per-request KV caches, emulated slowdown.

Everything here is synchronous and runs on the worker's single compute thread (see
``ComputeThread``), never on the event loop. Activations cross in and out as numpy
arrays so they can be framed without copies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from services.worker.compute_thread import ComputeThread
from services.worker.kv_budget import KvBudget, KvOverBudget, grown_capacity
from shared.errors import EdgesplitError
from shared.model.benchmark import compute_clock
from shared.model.kv_cache import SegmentCache
from shared.model.runtime import SegmentRuntime
from shared.model.source import TensorSource
from shared.tensor_frame import to_torch

__all__ = ["ComputeThread", "DecodeStep", "KvMissing", "SegmentHost", "Slowdown"]

T = TypeVar("T")


@dataclass
class Slowdown:
    """Emulated compute speed: after a forward that computed for t seconds, stay busy for
    (factor - 1) * t more, as a node `factor` times slower would. Thread-safe to change."""

    factor: float = 1.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, factor: float) -> None:
        with self._lock:
            self.factor = max(1.0, float(factor))

    def apply(self, compute_s: float) -> float:
        """Sleep the emulated extra for ``compute_s`` of compute; returns that extra (s)."""
        with self._lock:
            extra_s = (self.factor - 1.0) * compute_s
        if extra_s > 0:
            time.sleep(extra_s)
        return max(0.0, extra_s)


class KvMissing(EdgesplitError):
    """A decode step reached a segment that lacks the request's KV cache (it moved here
    and has not arrived, or was lost): the entry must replay the request."""


@dataclass(frozen=True)
class DecodeStep:
    """One request's row of a batched decode step: its [1, H] activation at ``position``."""

    request_id: str
    hidden: np.ndarray
    position: int




@dataclass
class _CacheEntry:
    cache: SegmentCache
    last_used_s: float


class SegmentHost:
    """A loaded segment [start, end) and the KV caches of the requests passing through it."""

    def __init__(self, source: TensorSource, start: int, end: int, device: str = "cpu",
                 budget: KvBudget | None = None) -> None:  # fmt: skip
        self.runtime = SegmentRuntime(source, start, end, device=device)
        self.start, self.end = start, end
        self.budget = budget
        """The node's KV budget (services/worker/kv_budget.py); None: unlimited."""
        self._kv_per_token = source.config.kv_bytes_per_token_per_block() * (end - start)
        self._caches: dict[str, _CacheEntry] = {}
        self._incoming: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._incoming_since: dict[str, float] = {}  # monotonic s of a partial import's first blocks
        self._lock = threading.Lock()
        self.on_forward: Callable[[int, int, float, int], None] | None = None
        """Called after each forward with (tokens per request, blocks, compute seconds incl.
        the emulated slowdown, see `compute_clock`; requests batched: 1, or a batched
        decode's); telemetry."""

    def forward(
        self, request_id: str, hidden: np.ndarray, start_position: int, slowdown: Slowdown
    ) -> np.ndarray:
        """Run the segment on [T, H] activations; keeps the request's KV cache. Compute thread.
        Raises KvMissing, KvOverBudget (nothing allocated)."""
        clock = compute_clock()
        began = clock()
        entry = self._cache_for(request_id, start_position, int(hidden.shape[0]))
        output = self.runtime.forward(to_torch(hidden), entry.cache, start_position)
        compute_s = clock() - began
        compute_s += slowdown.apply(compute_s)
        if self.on_forward is not None:
            self.on_forward(int(hidden.shape[0]), self.end - self.start, compute_s, 1)
        return output.numpy()

    def forward_batch(
        self, steps: Sequence[DecodeStep], slowdown: Slowdown
    ) -> list[np.ndarray | EdgesplitError]:
        """One decode step of several requests as ONE batched forward (the linear layers
        and MLP on the stacked rows, attention per request: SegmentRuntime.forward_batch).
        Compute thread. Returns, per step in order, its [1, H] output, or the error that
        concerns that request alone (KvMissing, KvOverBudget: it does not join the batch).
        A failure of the batched forward itself raises (every cache is rolled back)."""
        clock = compute_clock()
        began = clock()
        refused: dict[int, EdgesplitError] = {}
        joined: list[tuple[int, _CacheEntry]] = []
        for number, step in enumerate(steps):
            try:
                joined.append((number, self._cache_for(step.request_id, step.position, 1)))
            except (KvMissing, KvOverBudget) as error:
                refused[number] = error
        outputs: dict[int, np.ndarray] = {}
        if joined:
            rows = torch.cat([to_torch(steps[number].hidden) for number, _ in joined])  # [B, H]
            caches = [entry.cache for _, entry in joined]
            output = self.runtime.forward_batch(rows, caches, [steps[n].position for n, _ in joined]).numpy()
            outputs = {number: output[row : row + 1] for row, (number, _) in enumerate(joined)}
        results: list[np.ndarray | EdgesplitError] = [
            refused[number] if number in refused else outputs[number] for number in range(len(steps))
        ]
        compute_s = clock() - began
        compute_s += slowdown.apply(compute_s)
        if self.on_forward is not None and joined:
            self.on_forward(1, self.end - self.start, compute_s, len(joined))  # B decode steps, not a prefill
        return results

    def _cache_for(self, request_id: str, start_position: int, tokens: int) -> _CacheEntry:
        """The request's cache, ready to take ``tokens`` tokens at ``start_position``
        (created for a pass from position 0; cut back for a replayed step). Raises
        KvMissing when it is not here (yet), KvOverBudget when growing it would pass the
        node's KV budget (nothing allocated)."""
        with self._lock:
            entry = self._caches.get(request_id)
            if start_position == 0:
                self._incoming.pop(request_id, None)  # a replay rebuilds everything
                self._incoming_since.pop(request_id, None)
            if request_id in self._incoming or (entry is None and start_position > 0):
                raise KvMissing(f"blocks [{self.start}, {self.end}) hold no KV cache for "
                                f"request {request_id} at position {start_position}")  # fmt: skip
            if entry is not None:
                entry.last_used_s = time.monotonic()
        if entry is not None and 0 < start_position and entry.cache.length < start_position:
            raise KvMissing(f"request {request_id}: KV cache holds {entry.cache.length} tokens, "
                            f"the step starts at {start_position}")  # fmt: skip
        self._check_budget(request_id, entry, start_position + tokens)
        if entry is None:
            entry = _CacheEntry(self.runtime.new_cache(), time.monotonic())
            with self._lock:
                self._caches[request_id] = entry
        if start_position == 0 and entry.cache.length > 0:
            entry.cache.truncate(0)  # a replay from the start rebuilds the cache
        elif entry.cache.length > start_position:
            entry.cache.truncate(start_position)  # a replayed step: drop what follows it
        return entry

    def _check_budget(self, request_id: str, entry: _CacheEntry | None, tokens: int) -> None:
        """Raise KvOverBudget (nothing allocated yet) when holding ``tokens`` tokens of the
        request would grow its cache past the node's KV budget."""
        if self.budget is None:
            return
        capacity = entry.cache.capacity if entry is not None else 0
        extra = (grown_capacity(capacity, tokens) - capacity) * self._kv_per_token
        self.budget.check(extra, f"request {request_id} on blocks [{self.start}, {self.end})")

    def release(self, request_id: str) -> None:
        with self._lock:
            self._caches.pop(request_id, None)
            self._incoming.pop(request_id, None)
            self._incoming_since.pop(request_id, None)

    def export_kv(self, request_id: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        """Copies of the request's K/V per block, or None without a cache. Compute thread."""
        with self._lock:
            entry = self._caches.get(request_id)
        return None if entry is None else entry.cache.export()

    def import_kv(self, request_id: str, blocks: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Take K/V of some of this segment's blocks (moved here from other nodes); the
        request's cache appears once every block has arrived. True when complete.
        Raises KvOverBudget (nothing kept) when the blocks would pass the node's KV budget;
        a partial import is swept when the rest does not come (`sweep`)."""
        mine = {b: kv for b, kv in blocks.items() if self.start <= b < self.end}
        if self.budget is not None:
            size = sum(k.nelement() * k.element_size() + v.nelement() * v.element_size() for k, v in mine.values())
            self.budget.check(size, f"K/V of request {request_id} moved to blocks [{self.start}, {self.end})")
        with self._lock:
            incoming = self._incoming.setdefault(request_id, {})
            self._incoming_since.setdefault(request_id, time.monotonic())
            incoming.update(mine)
            if set(incoming) != set(range(self.start, self.end)):
                return False
            del self._incoming[request_id]
            self._incoming_since.pop(request_id, None)
        cache = self.runtime.new_cache()
        cache.import_blocks(incoming)
        with self._lock:
            self._caches[request_id] = _CacheEntry(cache, time.monotonic())
        return True

    def sweep(self, idle_timeout_s: float, partial_timeout_s: float | None = None) -> list[str]:
        """Free caches unused for ``idle_timeout_s`` and partial imports (K/V of some blocks
        moved here, the rest never came) older than ``partial_timeout_s`` (default: the
        same); returns the request ids freed."""
        now = time.monotonic()
        cutoff = now - idle_timeout_s
        partial_cutoff = now - (idle_timeout_s if partial_timeout_s is None else partial_timeout_s)
        with self._lock:
            stale = [rid for rid, entry in self._caches.items() if entry.last_used_s < cutoff]
            for rid in stale:
                del self._caches[rid]
            partial = [rid for rid, since in self._incoming_since.items() if since < partial_cutoff]
            for rid in partial:
                self._incoming.pop(rid, None)
                del self._incoming_since[rid]
        return stale + [rid for rid in partial if rid not in stale]

    def kv_bytes(self) -> int:
        """Bytes of cached K/V (tokens held, not spare capacity)."""
        with self._lock:
            return sum(entry.cache.nbytes for entry in self._caches.values())

    def kv_allocated_bytes(self) -> int:
        """Bytes the request caches (spare capacity included) and partial imports hold:
        what counts against the KV budget."""
        with self._lock:
            caches = sum(entry.cache.allocated_nbytes for entry in self._caches.values())
            partial = sum(k.nelement() * k.element_size() + v.nelement() * v.element_size()
                          for blocks in self._incoming.values() for k, v in blocks.values())  # fmt: skip
        return caches + partial

    def requests(self) -> int:
        with self._lock:
            return len(self._caches)
