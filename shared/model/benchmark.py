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
