"""A stalled consumer beside an ordinary client: how much it slows the other's tokens.

Starts its own Mosquitto (the project's config) and three workers (car, rsu, mec: a
4-block tiny llama, 1 torch thread each). Each round runs two phases of ``--seconds``,
side by side in alternating order: a consumer keeps ``--streams`` generations running
and reads its replies (``reading``), or subscribed to its replies and then never reads
its socket again (``stalled``, tests/integration/pressure.py: StalledReader); an
ordinary client generates one request after another beside it. Prints per phase the
ordinary client's median time per output token (measured at the client from token
arrivals), the factor stalled / reading, and each process's VmRSS growth (peak over the
phase start), the broker's included. Tokens are checked against the unsplit model.

    python -m bench.slow_consumer [--rounds 3] [--seconds 20] [--streams 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from shared.broker import start_local_broker
from shared.model.pipeline import LocalPipeline
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from tests.integration.cluster import (
    TEST_SIGNING_KEY,
    WorkerCluster,
    make_plan,
    publish_plan,
    settings_for,
)
from tests.integration.pressure import ConsumerPhase, consumer_phase

SEGMENTS = (("car", 0, 1), ("rsu", 1, 3), ("mec", 3, 4))
TOKENS = 40


def _growth(phase: ConsumerPhase) -> str:
    return ", ".join(f"{name} {(phase.peak_kb[name] - phase.first_kb[name]) / 1024:+.2f}"
                     for name in sorted(phase.peak_kb))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--streams", type=int, default=4)
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.streams < 1:
        print("slow_consumer: --rounds, --seconds and --streams must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-slow-consumer-"))
    broker = start_local_broker()
    model_dir = write_tiny_checkpoint("llama", root / "model", layers=4, seed=5)
    write_shards(model_dir, root / "shards")
    local = LocalPipeline(model_dir, ())
    cache: dict[tuple[int, ...], tuple[int, ...]] = {}

    def expected(prompt: list[int]) -> tuple[int, ...]:
        if tuple(prompt) not in cache:
            cache[tuple(prompt)] = tuple(local.generate(prompt, TOKENS).token_ids)
        return cache[tuple(prompt)]

    settings = settings_for(broker.url, "benchslow")
    workers = WorkerCluster(broker.url, "benchslow", root / "shards", root)
    prompts = [[10 + i, 40 + 3 * i, 7] for i in range(8)]
    phases: dict[str, list[ConsumerPhase]] = {"reading": [], "stalled": []}
    try:
        for node, trust in (("car", "2"), ("rsu", "1"), ("mec", "0")):
            workers.start(node, "--trust", trust, "--max-in-flight", "8")
        rejected = asyncio.run(publish_plan(settings, make_plan(1, "car", SEGMENTS, TEST_SIGNING_KEY)))
        if rejected:
            print(f"slow_consumer: plan rejected by {sorted(rejected)}", file=sys.stderr)
            return 1
        assert broker.process is not None
        pids = {node: p.pid for node, p in workers.processes.items()} | {"mosquitto": broker.process.pid}
        for round_ in range(args.rounds):
            order = ("reading", "stalled") if round_ % 2 == 0 else ("stalled", "reading")
            for name in order:
                phase = asyncio.run(consumer_phase(settings, "car", pids, reads=name == "reading",
                                                   seconds=args.seconds, prompts=prompts, tokens=TOKENS,
                                                   expected=expected, streams=args.streams))  # fmt: skip
                phases[name].append(phase)
                print(f"round {round_ + 1} {name:8s}: other client {phase.other_done} requests, median TPOT "
                      f"{phase.median_tpot_s * 1e3:6.1f} ms, wrong {phase.wrong}; consumer finished "
                      f"{phase.slow_done}; VmRSS growth MiB: {_growth(phase)}", flush=True)  # fmt: skip
    finally:
        workers.stop()
        broker.close()
    reading = statistics.median(p.median_tpot_s for p in phases["reading"])
    stalled = statistics.median(p.median_tpot_s for p in phases["stalled"])
    print(f"median TPOT of the other client: reading {reading * 1e3:.1f} ms, stalled {stalled * 1e3:.1f} ms, "
          f"factor stalled / reading {stalled / reading:.2f}")  # fmt: skip
    wrong = sum(p.wrong for ps in phases.values() for p in ps)
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
