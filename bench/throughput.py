"""Throughput under concurrent greedy streams (issue #21): batched decode steps, measured
side by side.

Variants, each at every concurrency of ``--streams``:

- ``local``: the unsplit model in this process with the same batching as the workers:
  each stream's prefill alone, then every decode step of the streams in flight as one
  batched forward (`SegmentRuntime.forward_batch`), the heads as one call;
- ``w1``: one worker process (entry, all blocks) on a broker of its own;
- ``w3``: three worker processes (car, rsu, mec: a third of the blocks each; 3 hops per
  token: car -> rsu -> mec -> car); the decode steps of a batch cross each hop as one
  batch frame (services/worker/batch_frames.py);
- ``w3-1f`` (with ``--frames-too``): the same three workers with ``--no-batch-frames``,
  every decode step in a frame of its own (the wire before batch frames), side by side.

For each it prints aggregate tokens/s, per-stream time per output token (TPOT) p50/p95,
time to first token (TTFT) p50, and, for w3, the busy-mode per-hop overhead
((w3 TPOT p50 - local TPOT p50) / 3 at the same concurrency) and w3 / local ratios.
Every variant's tokens are checked against the unsplit model run one stream at a time.

    .venv/bin/python -m bench.throughput [--model smollm2|DIR | --tiny] [--streams 1,2,4,8,16]
                                         [--tokens 32] [--frames-too]

On a shared 2-core machine the processes compete for the cores: read numbers as
measured under that load, and compare only ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.cli.client import ClientOptions, request
from services.cli.launcher import ensure_shards
from shared.broker import start_local_broker
from shared.config import BusSettings
from shared.errors import EdgesplitError
from shared.messages import GenerateRequest, RequestFinished, TokenGenerated
from shared.model.pipeline import LocalPipeline
from shared.model.prepare import default_models_dir, prepare_model
from shared.model.tiny import write_tiny_checkpoint
from shared.model.tokenizer import TextTokenizer
from tests.integration.cluster import WorkerCluster, make_plan, publish_plan, settings_for

TOPICS = ["The capital of France is", "Once upon a time, a robot", "Edge computing moves work",
          "The road-side unit saw a car", "In the factory, the line PC", "A short poem about rain:",
          "Python is a language that", "The weather tomorrow will be"]  # fmt: skip


REQUEST_TIMEOUT_S = 900.0
"""A whole stream's deadline: 16 streams of SmolLM2 on a loaded 2-core machine take minutes."""


@dataclass(frozen=True)
class Stream:
    """One stream's tokens and timings (s): TTFT from its start; TPOT after the first."""

    tokens: tuple[int, ...]
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class Run:
    streams: list[Stream]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(len(s.tokens) for s in self.streams) / self.wall_s

    def tpot_ms(self, q: float) -> float:
        values = sorted(s.tpot_s for s in self.streams)
        return 1e3 * values[min(len(values) - 1, round(q * (len(values) - 1)))]

    def ttft_ms(self) -> float:
        return 1e3 * statistics.median(s.ttft_s for s in self.streams)


def prompts_for(tokenizer: TextTokenizer, count: int) -> list[list[int]]:
    """``count`` distinct prompts of different lengths."""
    return [tokenizer.encode(TOPICS[i % len(TOPICS)] + " and" * (i // len(TOPICS))) for i in range(count)]


def local_batched(pipeline: LocalPipeline, prompts: list[list[int]], tokens: int) -> Run:
    """Greedy streams in one process: prefill each alone, then batched decode steps."""
    (segment,) = pipeline.segments
    entry = pipeline.entry
    began = time.perf_counter()
    caches = [segment.new_cache() for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    first: list[float] = [0.0] * len(prompts)
    for number, prompt in enumerate(prompts):
        hidden = segment.forward(entry.embed(torch.tensor(prompt), 0), caches[number], 0)
        out[number].append(int(torch.argmax(entry.logits(hidden[-1:])[0])))
        first[number] = time.perf_counter()
    positions = [len(p) for p in prompts]
    for _ in range(tokens - 1):
        rows = torch.cat([entry.embed(torch.tensor(o[-1:]), p) for o, p in zip(out, positions, strict=True)])
        hidden = segment.forward_batch(rows, caches, positions)
        logits = entry.logits(hidden)  # the heads as one call, as the entry runs them
        for number in range(len(prompts)):
            out[number].append(int(torch.argmax(logits[number])))
        positions = [p + 1 for p in positions]
    done = time.perf_counter()
    streams = [Stream(tuple(o), f - began, (done - f) / max(1, tokens - 1)) for o, f in zip(out, first, strict=True)]
    return Run(streams, done - began)


async def distributed(settings: BusSettings, prompts: list[list[int]], tokens: int, tag: str) -> Run:
    """The streams at once through the running workers."""
    began = time.perf_counter()

    async def one(number: int) -> Stream:
        arrivals: list[float] = []

        def make(client: str) -> GenerateRequest:
            return GenerateRequest(request_id=f"{tag}-{number}", reply_to=client,  # type: ignore[arg-type]
                                   token_ids=tuple(prompts[number]), max_new_tokens=tokens,
                                   timeout_s=REQUEST_TIMEOUT_S)  # fmt: skip

        def on_token(_: TokenGenerated) -> None:
            arrivals.append(time.perf_counter())

        result = await request(ClientOptions(settings, timeout_s=REQUEST_TIMEOUT_S), make, on_token)
        if not isinstance(result, RequestFinished):
            raise EdgesplitError(f"stream {number}: {result}")
        first = arrivals[0] if arrivals else time.perf_counter()
        last = arrivals[-1] if arrivals else first
        return Stream(result.token_ids, first - began, (last - first) / max(1, len(arrivals) - 1))

    streams = await asyncio.gather(*(one(n) for n in range(len(prompts))))
    return Run(list(streams), time.perf_counter() - began)


def model_folder(args: argparse.Namespace) -> Path:
    if args.tiny:
        return write_tiny_checkpoint("llama", Path(tempfile.mkdtemp(prefix="bench-tp-")) / "tiny", layers=12, seed=3)
    path = Path(args.model).expanduser()
    return path if path.is_dir() else prepare_model(args.model, progress=lambda line: print(line, file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="packaged model name or checkpoint folder")
    parser.add_argument("--tiny", action="store_true", help="a tiny random 12-block llama instead")
    parser.add_argument("--streams", default="1,2,4,8,16", help="concurrencies (default 1,2,4,8,16)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per stream (default 32)")
    parser.add_argument("--frames-too", action="store_true",
                        help="also w3-1f: three workers sending one frame per decode step (no batch frames)")
    args = parser.parse_args(argv)
    try:
        concurrencies = [int(c) for c in args.streams.split(",")]
        if min(concurrencies) < 1 or args.tokens < 2:
            raise ValueError
    except ValueError:
        print(f"bench.throughput: --streams takes positive integers, --tokens at least 2: "
              f"{args.streams!r}, {args.tokens}", file=sys.stderr)  # fmt: skip
        return 2
    torch.set_num_threads(1)
    model = model_folder(args)
    shards = ensure_shards(model, (default_models_dir() if not args.tiny else model.parent) / f"{model.name}-shards")
    tokenizer = TextTokenizer.from_file(model / "tokenizer.json")
    prompts = prompts_for(tokenizer, max(concurrencies))
    unsplit = LocalPipeline(model)
    layers = unsplit.config.num_layers
    # the local loop runs every stream its full length; a request ends at EOS
    full = [unsplit.generate(p, args.tokens, stop_at_eos=False).token_ids for p in prompts]
    eos = [unsplit.generate(p, args.tokens).token_ids for p in prompts]
    thirds = (("car", 0, layers // 3), ("rsu", layers // 3, 2 * layers // 3), ("mec", 2 * layers // 3, layers))
    layouts: dict[str, tuple[tuple[tuple[str, int, int], ...], tuple[str, ...]]] = {
        "w1": ((("car", 0, layers),), ()), "w3": (thirds, ())}  # fmt: skip
    if args.frames_too:
        layouts["w3-1f"] = (thirds, ("--no-batch-frames",))
    results: dict[tuple[str, int], Run] = {}
    print(f"model {model.name} ({layers} blocks), {args.tokens} greedy tokens per stream, 1 torch thread "
          "per process; shared machine: compare ratios within this run")  # fmt: skip
    print(f"{'variant':<7} {'streams':>7} {'tok/s':>8} {'TPOT p50':>9} {'p95':>8} {'TTFT p50':>9} {'tokens':>7}", flush=True)

    def measured(name: str, c: int, run: Run) -> None:
        results[(name, c)] = run
        same = all(s.tokens == e for s, e in zip(run.streams, full if name == "local" else eos, strict=False))
        print(f"{name:<7} {c:>7} {run.tokens_per_s:8.1f} {run.tpot_ms(0.5):9.1f} {run.tpot_ms(0.95):8.1f} "
              f"{run.ttft_ms():9.1f} {'same' if same else 'DIFFER':>7}", flush=True)  # fmt: skip

    for c in concurrencies:
        measured("local", c, local_batched(unsplit, prompts[:c], args.tokens))
    broker = start_local_broker()
    try:
        for name, (layout, extra) in layouts.items():
            settings = settings_for(broker.url, f"benchtp{name.replace('-', '')}")
            root = Path(tempfile.mkdtemp(prefix=f"bench-tp-{name}-"))
            workers = WorkerCluster(broker.url, settings.cluster, shards, root)
            try:
                for node, _, _ in layout:
                    workers.start(node, *extra, *(("--max-in-flight", str(max(concurrencies))) if node == "car" else ()))
                plan = make_plan(1, "car", layout, settings.plan_signing_key or "")
                if asyncio.run(publish_plan(settings, plan, 300)):
                    raise EdgesplitError(f"{name}: the workers refused the plan; logs in {root}")
                asyncio.run(distributed(settings, prompts[:1], 2, f"warm{name}"))
                for c in concurrencies:
                    measured(name, c, asyncio.run(distributed(settings, prompts[:c], args.tokens, f"{name}{c}")))
            finally:
                workers.stop()
    finally:
        broker.stop()
    for three in [name for name in layouts if name.startswith("w3")]:
        print(f"ratios (same concurrency): {three}/local tok/s, {three} TPOT p50 / local, per-hop overhead (ms/token/hop)")
        for c in concurrencies:
            local, w3 = results[("local", c)], results[(three, c)]
            hop_ms = (w3.tpot_ms(0.5) - local.tpot_ms(0.5)) / 3
            print(f"  {c:>2} streams: {w3.tokens_per_s / local.tokens_per_s:6.3f}  "
                  f"{w3.tpot_ms(0.5) / local.tpot_ms(0.5):6.3f}  {hop_ms:7.2f}")  # fmt: skip
    if "w3-1f" in layouts:
        print("batch frames against one frame per step (same run): w3 / w3-1f tok/s")
        for c in concurrencies:
            print(f"  {c:>2} streams: {results[('w3', c)].tokens_per_s / results[('w3-1f', c)].tokens_per_s:6.3f}")
    one = results[("w3", concurrencies[0])]
    for c in concurrencies[1:]:
        print(f"  w3 {c:>2} streams / {concurrencies[0]}: tok/s x{results[('w3', c)].tokens_per_s / one.tokens_per_s:.2f}, "
              f"TPOT p50 x{results[('w3', c)].tpot_ms(0.5) / one.tpot_ms(0.5):.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
