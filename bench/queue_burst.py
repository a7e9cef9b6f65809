"""A burst of requests at once against 3 workers, without and with the entry's waiting
queue, side by side (issue 21, item 3).

Each variant is a fresh stack on its own Mosquitto: car [0,1), rsu [1,3), mec [3,4) of a
4-block tiny llama, car the entry running 8 requests at once (``--max-in-flight 8``),
with ``--max-queued-requests 0`` (every request past 8 refused ``busy`` at once: the
behaviour before the queue) and then with the default queue bound (at least 64). The
burst goes out over one client connection; every completion's tokens are checked
against the in-process unsplit model. Prints completions, ``busy`` refusals and the
burst's wall time (first send to last answer) per variant, and their ratios.

    .venv/bin/python bench/queue_burst.py [--requests 60] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.cli.client import Client, ClientOptions
from shared.broker import start_local_broker
from shared.errors import Busy
from shared.messages import RequestFinished
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

SEGMENTS = (("car", 0, 1), ("rsu", 1, 3), ("mec", 3, 4))


@dataclass(frozen=True)
class Burst:
    completed: int
    busy: int
    other: int
    wrong: int
    wall_s: float


def _prompt(index: int) -> list[int]:
    return [11 + index % 200, 23 + (5 * index) % 200, 37 + index % 40]


async def _burst(settings: object, requests: int, tokens: int, local: LocalPipeline) -> Burst:
    async with Client(options=ClientOptions(settings, timeout_s=300.0)) as client:  # type: ignore[arg-type]
        began = time.perf_counter()
        streams = [client.generate(_prompt(i), max_new_tokens=tokens) for i in range(requests)]
        results = await asyncio.gather(*(s.collect() for s in streams), return_exceptions=True)
        wall_s = time.perf_counter() - began
    done = {i: r for i, r in enumerate(results) if isinstance(r, RequestFinished)}
    wrong = sum(1 for i, r in done.items() if r.token_ids != local.generate(_prompt(i), tokens).token_ids)
    busy = sum(1 for r in results if isinstance(r, Busy))
    return Burst(len(done), busy, requests - len(done) - busy, wrong, wall_s)


def _variant(root: Path, queue: list[str], requests: int, tokens: int, local: LocalPipeline) -> Burst:
    broker = start_local_broker()
    try:
        settings = settings_for(broker.url, "benchqueue")
        workers = WorkerCluster(broker.url, "benchqueue", root / "shards", root)
        try:
            workers.start("car", "--trust", "2", "--max-in-flight", "8", *queue)
            workers.start("rsu", "--trust", "1")
            workers.start("mec", "--trust", "0")
            rejected = asyncio.run(publish_plan(settings, make_plan(1, "car", SEGMENTS, TEST_SIGNING_KEY)))
            if rejected:
                raise RuntimeError(f"plan rejected by {sorted(rejected)}")
            return asyncio.run(_burst(settings, requests, tokens, local))
        finally:
            workers.stop()
    finally:
        broker.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = write_tiny_checkpoint("llama", root / "model", layers=4, seed=7)
        write_shards(model, root / "shards")
        local = LocalPipeline(model, ())
        without = _variant(root, ["--max-queued-requests", "0"], args.requests, args.tokens, local)
        queued = _variant(root, [], args.requests, args.tokens, local)
    print(f"{args.requests} requests at once, {args.tokens} tokens each, 3 workers, 8 in flight")
    print(f"{'':<22}{'no queue':>10}{'queue':>10}{'queue / no queue':>18}")
    for name in ("completed", "busy", "other", "wrong", "wall_s"):
        a, b = getattr(without, name), getattr(queued, name)
        ratio = f"{b / a:.2f}" if a else "-"
        print(f"{name:<22}{a:>10.2f}{b:>10.2f}{ratio:>18}" if name == "wall_s" else f"{name:<22}{a:>10}{b:>10}{ratio:>18}")
    return 0 if without.wrong == queued.wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
