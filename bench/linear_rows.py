"""fp32 linear layers on few rows: torch's ``F.linear`` against ``W x^T``, side by side.

A decode step multiplies one row (or a few: a batched step) by every weight. Loads
SmolLM2 (fp32) once and runs decode steps of 1, 2, 3, 4 and 8 rows (a 30-block
``forward_batch`` and the head, KV caches growing) with ``layers.linear`` as shipped
(``W x^T`` up to ``layers.SKINNY_ROWS`` rows, one row padded to two) and with plain
``F.linear`` for every row count, alternated ``--repeats`` times; prints the median ms
per step of each and their ratio.

    .venv/bin/python -m bench.linear_rows [--repeats 7] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.local import resolve_model
from shared.model import layers
from shared.model.pipeline import LocalPipeline


def step_ms(pipeline: LocalPipeline, rows: int, repeats: int, steps: int) -> dict[str, float]:
    """Median ms per decode step of ``rows`` requests, shipped against plain F.linear."""
    segment = pipeline.segments[0]
    caches = [segment.new_cache() for _ in range(rows)]
    for number, cache in enumerate(caches):
        segment.forward(torch.randn(10 + number, pipeline.config.hidden_size), cache, 0)
    positions = [10 + number for number in range(rows)]
    shipped = layers.SKINNY_ROWS
    times: dict[str, list[float]] = {"shipped": [], "F.linear": []}
    for _ in range(repeats):
        for name, skinny in (("shipped", shipped), ("F.linear", 0)):
            layers.SKINNY_ROWS = skinny
            try:
                began = time.perf_counter()
                for _ in range(steps):
                    hidden = segment.forward_batch(torch.randn(rows, pipeline.config.hidden_size), caches, positions)
                    pipeline.entry.logits(hidden)
                    positions = [position + 1 for position in positions]
                times[name].append((time.perf_counter() - began) / steps * 1e3)
            finally:
                layers.SKINNY_ROWS = shipped
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="decode steps per timed run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipeline = LocalPipeline(resolve_model(args.model))
    print(f"{args.model}, fp32, 1 thread, one segment of all blocks + head, median of {args.repeats}; "
          f"shipped: W x^T up to {layers.SKINNY_ROWS} rows")  # fmt: skip
    print(f"{'rows':>4} {'shipped ms':>11} {'F.linear ms':>12} {'F.linear / shipped':>19}")
    for rows in (1, 2, 3, 4, 8):
        medians = step_ms(pipeline, rows, args.repeats, args.steps)
        print(f"{rows:>4} {medians['shipped']:11.1f} {medians['F.linear']:12.1f} "
              f"{medians['F.linear'] / medians['shipped']:18.2f}x", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
