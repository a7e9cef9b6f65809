"""One hop over a slow emulated link: fp32 against fp16 and int8 activation frames.

Two real workers on a real Mosquitto hold SmolLM2 ``car [0, 15)`` and ``rsu [15, 30)``;
``car`` (the entry) shapes its egress to ``rsu`` to ``--rate`` bytes/s (the worker's own
link emulation, services/worker/shaper.py; default 20 kB/s) and sends its activation
frames at the precision under test (``--activation-precision``). The result frame back
to the entry is unshaped and stays fp32. For each variant the workers are started
afresh, one warm-up request runs, then ``--repeats`` greedy requests of ``--tokens``
tokens; the median time per output token (TPOT, from the entry's RequestFinished) is
printed. The hop's time per token is a variant's TPOT minus the unshaped fp32 TPOT of
the same run (compute, broker and the result hop cancel out); the last column is fp32's
hop time over the variant's (issue #22 asks int8 >= 3x at 20 kB/s).

    .venv/bin/python -m bench.activation_link [--rate 20000] [--tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

from services.cli.client import ClientOptions, request
from services.cli.launcher import ensure_shards
from shared.broker import start_local_broker
from shared.messages import GenerateRequest, RequestFinished
from shared.model.prepare import default_models_dir, prepare_model
from tests.integration.cluster import WorkerCluster, make_plan, publish_plan, settings_for

PROMPT_IDS = (1, 504, 3458, 282, 4649, 314, 7042, 30)
LAYOUT = (("car", 0, 15), ("rsu", 15, 30))
VARIANTS = (("unshaped", "fp32", False), ("fp32", "fp32", True), ("fp16", "fp16", True),
            ("int8", "int8", True))  # fmt: skip


def run_variant(shards: Path, broker_url: str, name: str, precision: str, shaped: bool,
                rate: float, tokens: int, repeats: int) -> list[float]:  # fmt: skip
    """TPOT (s) of ``repeats`` requests on a fresh pair of workers."""
    settings = settings_for(broker_url, f"benchlink{name}")
    root = Path(tempfile.mkdtemp(prefix=f"bench-link-{name}-"))
    workers = WorkerCluster(broker_url, settings.cluster, shards, root)
    car_args = ["--trust", "2", "--activation-precision", precision]
    if shaped:
        car_args += ["--links", json.dumps({"rsu": [rate, 0.0]})]
    try:
        workers.start("car", *car_args)
        workers.start("rsu", "--trust", "1")
        plan = make_plan(1, "car", LAYOUT, settings.plan_signing_key)
        assert not asyncio.run(publish_plan(settings, plan, 300)), workers.log_tail("car")
        results = []
        for index in range(repeats + 1):
            def make(client: str, index: int = index) -> GenerateRequest:
                return GenerateRequest(request_id=f"{name}{index}", reply_to=client,  # type: ignore[arg-type]
                                       token_ids=PROMPT_IDS, max_new_tokens=tokens)  # fmt: skip

            result = asyncio.run(request(ClientOptions(settings, timeout_s=300), make))
            assert isinstance(result, RequestFinished)
            if index:  # the first request warms up
                results.append(result.tpot_s)
        return results
    finally:
        workers.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rate", type=float, default=20_000.0, help="link bytes/s (car -> rsu)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = prepare_model(args.model, progress=lambda line: print(line, file=sys.stderr))
    shards = ensure_shards(model_dir, default_models_dir() / f"{model_dir.name}-shards")
    broker = start_local_broker()
    try:
        tpot = {name: statistics.median(run_variant(shards, broker.url, name, precision, shaped,
                                                    args.rate, args.tokens, args.repeats))
                for name, precision, shaped in VARIANTS}  # fmt: skip
    finally:
        broker.close()
    print(f"{model_dir.name}, car [0,15) -> rsu [15,30), link {args.rate / 1e3:.0f} kB/s, "
          f"{args.tokens} tokens, median of {args.repeats}")  # fmt: skip
    print(f"{'frames':10} {'TPOT ms':>9} {'hop ms/token':>13} {'fp32 hop / hop':>15}")
    fp32_hop = tpot["fp32"] - tpot["unshaped"]
    for name, _, shaped in VARIANTS:
        hop = tpot[name] - tpot["unshaped"] if shaped else 0.0
        ratio = f"{fp32_hop / hop:14.2f}x" if shaped and hop > 0 else f"{'-':>15}"
        print(f"{name:10} {tpot[name] * 1e3:9.1f} {hop * 1e3:13.1f} {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
