"""Decode stall at a live plan switch (SmolLM2 over three real worker processes).

Starts its own Mosquitto and three workers (no emulated shaping, 1 torch thread each),
streams a greedy generation and, mid-stream, rolls out a new epoch two-phase
(PREPARE -> READY -> PLAN + COMMIT) that moves a boundary:

1. ``uncached``: rsu takes blocks it never held (their shards are read and verified),
2. ``cached``: the boundary moves back; every node already holds the weights.

For each it prints PREPARE->all READY time (the shard load, paid while the old epoch
keeps serving) and the stall: the longest gap between tokens around the switch minus
the median of the neighbouring gaps. Tokens are checked against an undisturbed in-process run.

    python -m bench.reconfig [--model smollm2] [--tokens 48] [--repeats 3] [--prompt TEXT]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from services.cli.client import ClientOptions, request
from services.cli.launcher import ensure_shards
from shared.broker import start_local_broker
from shared.messages import GenerateRequest, RequestFinished, TokenGenerated
from shared.model.pipeline import LocalPipeline
from shared.model.prepare import default_models_dir, prepare_model
from shared.model.tokenizer import TextTokenizer
from tests.integration.cluster import (
    WorkerCluster,
    make_plan,
    publish_plan,
    settings_for,
    two_phase,
)

PROMPT = "Write a short story about a robot that learns to paint. Once upon a time"
LAYOUTS = {
    "initial": (("car", 0, 10), ("rsu", 10, 20), ("mec", 20, 30)),
    "uncached": (("car", 0, 10), ("rsu", 10, 23), ("mec", 23, 30)),
    "cached": (("car", 0, 10), ("rsu", 10, 20), ("mec", 20, 30)),
}


async def generate_with_switch(settings, prompt: str, tokens: int, switch_after: int,
                               plan) -> tuple[RequestFinished, list[float], float, int]:  # noqa: ANN001  # fmt: skip
    """Stream one request; after ``switch_after`` tokens roll out ``plan``. Returns the
    result, token arrival times, PREPARE->READY seconds and the index of the switch."""
    arrivals: list[float] = []
    switch = asyncio.Event()

    def on_token(token: TokenGenerated) -> None:
        arrivals.append(time.perf_counter())
        if len(arrivals) == switch_after:
            switch.set()

    def make(client: str) -> GenerateRequest:
        return GenerateRequest(request_id=f"b{plan.epoch}", reply_to=client, prompt=prompt,  # type: ignore[arg-type]
                               max_new_tokens=tokens)  # fmt: skip

    async with asyncio.TaskGroup() as group:
        task = group.create_task(request(ClientOptions(settings, timeout_s=300), make, on_token))
        await switch.wait()
        began = time.perf_counter()
        answers = await two_phase(settings, plan, timeout_s=120)
        prepare_s = time.perf_counter() - began
        assert set(answers.values()) == {"ready"}, answers
        index = len(arrivals)
    result = task.result()
    assert isinstance(result, RequestFinished)
    return result, arrivals, prepare_s, index


def stall_ms(arrivals: list[float], switch_index: int) -> tuple[float, float]:
    """(longest gap in the 3 tokens after the switch minus the normal gap, normal gap), ms.

    The normal gap is the median of the 8 gaps on each side of that window, not of the
    whole stream: on a shared machine the load drifts within one generation, and a
    baseline from far away would charge (or credit) that drift to the switch."""
    gaps = [b - a for a, b in zip(arrivals[1:], arrivals[2:], strict=False)]
    low, high = max(0, switch_index - 2), switch_index + 3
    around = gaps[low:high]
    neighbours = gaps[max(0, low - 8) : low] + gaps[high : high + 8]
    normal = statistics.median(neighbours or gaps)
    return (max(around) - normal) * 1e3, normal * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--repeats", type=int, default=3, help="cached switch pairs")
    args = parser.parse_args()
    model_dir = prepare_model(args.model, progress=lambda line: print(line, file=sys.stderr))
    shards = ensure_shards(model_dir, default_models_dir() / f"{model_dir.name}-shards")
    root = Path(tempfile.mkdtemp(prefix="bench-reconfig-"))
    broker = start_local_broker()
    settings = settings_for(broker.url, "benchreconfig")
    workers = WorkerCluster(broker.url, settings.cluster, shards, root)
    key = settings.plan_signing_key
    try:
        for node in ("car", "rsu", "mec"):
            workers.start(node)
        assert not asyncio.run(publish_plan(settings, make_plan(1, "car", LAYOUTS["initial"], key), 300))
        tokenizer = TextTokenizer.from_file(model_dir / "tokenizer.json")
        expected = LocalPipeline(model_dir).generate(tokenizer.encode(args.prompt), args.tokens).token_ids
        print(f"model {model_dir.name}, {args.tokens} tokens, prompt of "
              f"{len(tokenizer.encode(args.prompt))} tokens; switch after token 16")  # fmt: skip
        print(f"{'switch':<10} {'layout':<34} {'prepare_s':>9} {'gap_ms':>7} {'stall_ms':>8} {'tokens':>7}")
        # The first move loads blocks rsu never held; later moves alternate between the two
        # layouts, whose weights every node then holds in its block cache.
        schedule = ["uncached"] + ["cached", "uncached-again"] * args.repeats
        stalls: dict[str, list[float]] = {}
        for epoch, name in enumerate(schedule, start=2):
            layout_name = "uncached" if name.startswith("uncached") else "cached"
            plan = make_plan(epoch, "car", LAYOUTS[layout_name], key)
            result, arrivals, prepare_s, index = asyncio.run(
                generate_with_switch(settings, args.prompt, args.tokens, 16, plan))  # fmt: skip
            stall, gap = stall_ms(arrivals, index)
            kind = "load" if name == "uncached" else "cached"
            stalls.setdefault(kind, []).append(stall)
            same = "same" if result.token_ids == expected else "DIFFER"
            layout = " ".join(f"{n}[{s},{e})" for n, s, e in LAYOUTS[layout_name])
            print(f"{kind:<10} {layout:<34} {prepare_s:9.3f} {gap:7.1f} {stall:8.1f} {same:>7}")
        print(f"median stall with weights cached: {statistics.median(stalls['cached']):.1f} ms "
              f"over {len(stalls['cached'])} switches; with a shard load: {stalls['load'][0]:.1f} ms")
    finally:
        workers.stop()
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
