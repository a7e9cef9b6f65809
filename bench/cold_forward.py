"""CPU time of a decode forward back to back and after an idle gap (as an emulated slowdown's sleep leaves it).

Runs two blocks of a tiny llama (the integration tests' model) on one torch thread and
times each one-token decode forward with ``time.thread_time`` (the clock the worker's
telemetry uses), with no gap, or with a sleep of ``--gaps`` ms between forwards. Prints
the lower quartile and median in ms per block for each, twice in turn.

    .venv/bin/python -m bench.cold_forward [--forwards 400] [--gaps 0,0.5,3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from shared.model.runtime import SegmentRuntime
from shared.model.shard import ShardStore, write_shards
from shared.model.tiny import write_tiny_checkpoint


def timed(runtime: SegmentRuntime, gap_s: float, forwards: int) -> list[float]:
    """Seconds of compute-thread CPU per block of ``forwards`` decode steps."""
    hidden_size = runtime.config.hidden_size
    prompt = torch.randn(8, hidden_size) * 0.1
    cache = runtime.new_cache()
    runtime.forward(prompt, cache, 0)
    samples = []
    for _ in range(forwards):
        if cache.length > 200:
            cache = runtime.new_cache()
            runtime.forward(prompt, cache, 0)
        step = torch.randn(1, hidden_size) * 0.1
        began = time.thread_time()
        runtime.forward(step, cache, cache.length)
        samples.append((time.thread_time() - began) / 2)
        if gap_s:
            time.sleep(gap_s)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=400)
    parser.add_argument("--gaps", default="0,0.5,3", help="ms between forwards, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        shards = Path(folder) / "shards"
        write_shards(write_tiny_checkpoint("llama", Path(folder) / "model"), shards)
        runtime = SegmentRuntime(ShardStore(shards), 2, 4)
        for _ in range(2):
            for gap_ms in (float(gap) for gap in args.gaps.split(",")):
                samples = sorted(timed(runtime, gap_ms / 1e3, args.forwards))
                print(f"gap {gap_ms:.1f} ms: lower quartile {samples[len(samples) // 4] * 1e3:.3f}, "
                      f"median {statistics.median(samples) * 1e3:.3f} ms/block")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
