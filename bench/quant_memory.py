"""Resident memory of a worker holding the same blocks at fp32 and at int8, side by side.

For each precision, writes (once, cached under ``--stores``) a shard store of the model
with ``edgesplit shard --weights P`` and starts a fresh process that loads blocks
``[start, end)`` the way a worker does: ``SegmentHost`` over ``CachedShards`` over a
``ShardStore`` (services/worker), with the worker's allocator setting
(``shared.process.fix_mmap_threshold``), then runs one forward. It reads ``VmRSS`` from
/proc/self/status after the imports and the store's manifest (baseline) and after the
load (glibc's ``malloc_trim(0)`` first, so freed load buffers are not counted), and
prints the growth (the blocks' resident cost) per precision, the int8 / fp32 ratio
(issue #22 asks at most 0.35) and the bytes the loaded weights hold by count.

    .venv/bin/python -m bench.quant_memory [--model smollm2] [--start 0 --end 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.local import resolve_model

_CHILD = r"""
import ctypes, gc, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")
import numpy as np, torch
torch.set_num_threads(1)
from shared.process import fix_mmap_threshold
fix_mmap_threshold()  # as services/worker/__main__.py does
from services.worker.compute import SegmentHost, Slowdown
from services.worker.shard_cache import CachedShards
from shared.model.shard import ShardStore
store = ShardStore(sys.argv[1]); start, end = int(sys.argv[2]), int(sys.argv[3])
store.verify_all()
gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
before = rss()
host = SegmentHost(CachedShards(store, 2_000_000_000), start, end)
hidden = np.zeros((4, store.config.hidden_size), dtype=np.float32)
host.forward("r", hidden, 0, Slowdown())
gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"before": before, "after": rss(), "weight_bytes": host.runtime.weight_bytes}))
"""


def ensure_store(model_dir: Path, stores: Path, weights: str) -> Path:
    """``edgesplit shard`` of the model at ``weights`` (written once, then reused)."""
    out = stores / f"{model_dir.name}-{weights}"
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "services.cli", "shard", str(model_dir), "--out",
                        str(out), "--weights", weights], check=True)  # fmt: skip
    return out


def measure(store: Path, start: int, end: int) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-c", _CHILD, str(store), str(start), str(end)],
                            check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
    reading: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    return reading


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--stores", type=Path, default=Path("/tmp/edgesplit-quant-stores"))
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--end", type=int, default=30)
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    readings = {}
    for weights in ("fp32", "int8", "int4"):
        readings[weights] = measure(ensure_store(model_dir, args.stores, weights), args.start, args.end)
    print(f"blocks [{args.start}, {args.end}) of {model_dir.name}, one worker-like process each")
    print(f"{'weights':8} {'RSS growth MB':>14} {'weights held MB':>16} {'RSS vs fp32':>12}")
    base = readings["fp32"]["after"] - readings["fp32"]["before"]
    for weights, reading in readings.items():
        growth = reading["after"] - reading["before"]
        print(f"{weights:8} {growth / 1e6:14.1f} {reading['weight_bytes'] / 1e6:16.1f} "
              f"{growth / base:12.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
