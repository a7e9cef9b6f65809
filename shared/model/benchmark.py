"""Timing one real block of a model: what a worker reports before its first forward, and
what the scenario runner plans a declared topology with (services/cli/scenarios/
first_plan.py). Both time with `compute_clock`, the clock real forwards use."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from shared.model.shard import ShardStore

BENCHMARK_PREFILL_TOKENS = 16
BENCHMARK_REPEATS = 5
BENCHMARK_BATCH = 4
"""Requests in the batched decode step the start-up benchmark times (its batch scaling)."""


def compute_clock() -> Callable[[], float]:
    """The clock that times a forward on the calling (compute) thread: its CPU time when
    torch runs single-threaded there, so waiting for a core or the GIL on a shared machine
    is not counted as compute (that is load: busy share and queue report it); wall time
    when torch spreads a forward over several threads."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def benchmark_block(store: ShardStore, slowdown_factor: float, device: str = "cpu") -> tuple[float, float]:
    """Time one real block of the model: (decode s per block, prefill s per block-token).

    Runs on the compute thread (it imports and runs torch) and times with the clock real
    forwards use (`compute_clock`: the thread's CPU time). The emulated slowdown is
    applied by scaling, not by sleeping. Raises what loading the block raises
    (CheckpointError for a bad shard).
    """
    from shared.model.runtime import SegmentRuntime

    runtime = SegmentRuntime(store, 0, 1, device=device)
    hidden_size = runtime.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(BENCHMARK_PREFILL_TOKENS, hidden_size, generator=generator) * 0.1
    step = torch.randn(1, hidden_size, generator=generator) * 0.1
    clock = compute_clock()
    prefill, decode = [], []
    for _ in range(BENCHMARK_REPEATS):
        cache = runtime.new_cache()
        began = clock()
        runtime.forward(prompt, cache, 0)
        prefill.append((clock() - began) / BENCHMARK_PREFILL_TOKENS)
        began = clock()
        runtime.forward(step, cache, BENCHMARK_PREFILL_TOKENS)
        decode.append(clock() - began)
    return statistics.median(decode) * slowdown_factor, statistics.median(prefill) * slowdown_factor


def benchmark_batch_scaling(store: ShardStore, device: str = "cpu") -> float | None:
    """How one real block's decode step scales with a batch: a step of BENCHMARK_BATCH
    requests as one forward takes ``single * (1 + scaling * (BENCHMARK_BATCH - 1))``;
    returns the scaling (0: extra rows are free, 1: no gain over one at a time), or None
    for an encoder (no decode steps). Compute thread, `compute_clock` like real forwards;
    the emulated slowdown scales both times alike, so it does not enter."""
    from shared.model.runtime import SegmentRuntime

    runtime = SegmentRuntime(store, 0, 1, device=device)
    if not runtime.config.is_decoder:
        return None
    hidden_size = runtime.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(BENCHMARK_PREFILL_TOKENS, hidden_size, generator=generator) * 0.1
    rows = torch.randn(BENCHMARK_BATCH, hidden_size, generator=generator) * 0.1
    clock = compute_clock()
    single, batched = [], []
    for _ in range(BENCHMARK_REPEATS):
        caches = [runtime.new_cache() for _ in range(BENCHMARK_BATCH)]
        for cache in caches:
            runtime.forward(prompt, cache, 0)
        began = clock()
        runtime.forward(rows[:1], caches[0], BENCHMARK_PREFILL_TOKENS)
        single.append(clock() - began)
        for cache in caches:
            cache.truncate(BENCHMARK_PREFILL_TOKENS)
        began = clock()
        runtime.forward_batch(rows, caches, [BENCHMARK_PREFILL_TOKENS] * BENCHMARK_BATCH)
        batched.append(clock() - began)
    ratio = statistics.median(batched) / max(statistics.median(single), 1e-9)
    return max(0.0, (ratio - 1.0) / (BENCHMARK_BATCH - 1))
