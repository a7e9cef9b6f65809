"""How much slower a segment's forward runs when its process was idle, or another
process's compute ran, since its last forward: the cost a pipeline pays per node that a
single process never pays (docs/PERFORMANCE.md).

In a pipeline of N workers serving one request, each worker computes about 1/N of every
decode step and waits the rest; the unsplit model in one process computes without a
break. This benchmark runs one segment (the same blocks a worker would hold) in this
process, single-threaded like the workers, one decode token per forward, in interleaved
rounds of four modes:

- ``back-to-back``: forwards with no gap (the unsplit process's situation);
- ``idle``: the thread sleeps ``--gap-ms`` before each forward (a worker waiting for
  the other workers' compute);
- ``other-compute``: another segment of the same size runs before each forward, in
  this thread (the caches see what the other workers' compute does to them, with no
  idle time);
- ``idle+other``: both.

    .venv/bin/python -m bench.idle_compute --blocks 10 --forwards 30 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from shared.errors import EdgesplitError
from shared.model.checkpoint import Checkpoint
from shared.model.prepare import prepare_model
from shared.model.runtime import SegmentRuntime
from shared.model.source import TensorSource

MODES = ("back-to-back", "idle", "other-compute", "idle+other")


class Segment:
    """One segment with its KV cache, decoding one token per forward."""

    def __init__(self, store: TensorSource, start: int, end: int, prompt: int) -> None:
        self.runtime = SegmentRuntime(store, start, end)
        self.hidden = store.config.hidden_size
        self.reset(prompt)

    def reset(self, prompt: int) -> None:
        self.cache = self.runtime.new_cache()
        self.runtime.forward(torch.randn(prompt, self.hidden), self.cache, 0)
        self.position = prompt

    def forward(self) -> float:
        token = torch.randn(1, self.hidden)
        began = time.perf_counter()
        self.runtime.forward(token, self.cache, self.position)
        self.position += 1
        return time.perf_counter() - began


def run_mode(mode: str, mine: Segment, other: Segment, forwards: int, gap_s: float) -> list[float]:
    times = []
    for _ in range(forwards):
        if "idle" in mode:
            time.sleep(gap_s)
        if "other" in mode:
            other.forward()
        times.append(mine.forward())
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="packaged model name or folder")
    parser.add_argument("--blocks", type=int, default=10, help="blocks per segment (default 10)")
    parser.add_argument("--forwards", type=int, default=30, help="forwards per mode and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--gap-ms", type=float, default=35.0, help="idle gap (default 35 ms)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        store = Checkpoint(
            prepare_model(args.model, progress=lambda line: print(line, file=sys.stderr))
        )
    except EdgesplitError as error:
        print(f"idle_compute: {error}", file=sys.stderr)
        return 2
    layers = store.config.num_layers
    if not 0 < 2 * args.blocks <= layers:
        print(f"idle_compute: --blocks must be in 1..{layers // 2}", file=sys.stderr)
        return 2
    mine, other = (
        Segment(store, 0, args.blocks, 12),
        Segment(store, args.blocks, 2 * args.blocks, 12),
    )
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    gap_s = args.gap_ms / 1e3
    for round_ in range(args.rounds):
        order = MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]  # rotate
        for mode in order:
            for segment in (mine, other):
                segment.reset(12)  # the same context length in every mode
            median = statistics.median(run_mode(mode, mine, other, args.forwards, gap_s))
            results[mode].append(median)
            print(
                f"  round {round_ + 1}/{args.rounds} {mode:14} {median * 1e3:7.2f} ms",
                file=sys.stderr,
            )
    base = statistics.median(results["back-to-back"])
    print(f"{args.blocks} blocks of {args.model}, 1 thread, {args.forwards} forwards x {args.rounds} rounds, "
          f"idle gap {args.gap_ms:g} ms")  # fmt: skip
    print(f"{'mode':15} {'median ms':>10} {'best ms':>8} {'x back-to-back':>15}")
    report: Callable[[str], None] = lambda mode: print(  # noqa: E731
        f"{mode:15} {statistics.median(results[mode]) * 1e3:10.2f} {min(results[mode]) * 1e3:8.2f} "
        f"{statistics.median(results[mode]) / base:15.3f}"
    )
    for mode in MODES:
        report(mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
