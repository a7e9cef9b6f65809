"""Cost of the data plane: SmolLM2 unsplit in one process vs split over 1-4 worker processes.

Starts its own Mosquitto, prepares SmolLM2 and its shard store (cached under the models
dir), and starts one cluster of real worker processes per pipeline width N (``python -m
services.worker ... --threads 1``, no emulated links or slowdown, so a hop costs only
software). Each cluster gets a signed plan cutting the blocks evenly over its N workers
(``nNw0`` is the entry and holds the first segment). Greedy requests go through
``services.cli.client``; TTFT and TPOT come from the entry's RequestFinished. The baseline is
``LocalPipeline`` in this process with one torch thread (each worker uses one too).

Variants are interleaved, ``--repeats`` rounds in a rotating order, after a warm-up. The
table shows medians over rounds and, less sensitive to other processes on the machine,
the best round's median interval between tokens; then the per-hop overhead
(distributed - local) / hops, a hop being one activation frame sent per decode step (N
for N >= 2 workers, none for N = 1). It ends with raw bus round trips (p50/p99) of a
decode-sized (2.3 KB) and a prefill-sized (300 KB) frame and of a QoS 1 control message.

    .venv/bin/python -m bench.transport [--tokens 32] [--repeats 5] [--workers 1,2,3,4]
        [--tree old=/path/to/worktree-of-old-commit --tree new=.]

With ``--tree`` the same widths run once per source tree, interleaved in the same rounds
against the same local baseline: a side-by-side comparison of two commits' workers.

Exit status 1 when a distributed run's tokens differ from the local ones.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from bench.wire import control_round_trips, frame_round_trips, percentile
from services.cli.launcher import Stack, ensure_shards, publish_plan_and_wait
from services.worker.compute import ComputeThread
from shared.broker import LocalBroker, start_local_broker
from shared.bus import Bus
from shared.config import BusSettings
from shared.errors import EdgesplitError, NoAnswer, ServingError
from shared.messages import GenerateRequest, Plan, RequestFinished, Segment, TokenGenerated
from shared.model.pipeline import LocalPipeline
from shared.model.prepare import default_models_dir, prepare_model
from shared.model.shard import ShardStore
from shared.process import first_edgesplit_error
from shared.security.signing import control_key
from shared.topics import REPLIES, REQUESTS

PROMPT = "The capital of France is Paris. The capital of Germany is"
DECODE_GOAL_MS_PER_HOP = 1.5
WIDTH_GOAL = (3, 1.10)  # 3 workers within 1.10 x of one process
RTT_SIZES_BYTES = {"decode 2.3 KB": 2304, "prefill 300 KB": 294_912}
LOCAL = "local"


@dataclass(frozen=True)
class Tree:
    """A source tree (e.g. a git worktree of an older commit) whose workers are measured
    beside this tree's: ``--tree old=/path/to/worktree``."""

    label: str
    path: Path


def even_segments(num_layers: int, workers: int) -> list[tuple[int, int]]:
    """[start, end) block ranges splitting ``num_layers`` over ``workers`` as evenly as possible."""
    if not 1 <= workers <= num_layers:
        raise EdgesplitError(f"cannot split {num_layers} blocks over {workers} workers")
    bounds = [index * num_layers // workers for index in range(workers + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def node_id(workers: int, index: int) -> str:
    """``n{width}w{position}``: ids that say which cluster and segment a log belongs to."""
    return f"n{workers}w{index}"


def hops(workers: int) -> int:
    """Activation frames sent per decode step: w0 -> w1 -> ... -> w(N-1) -> w0."""
    return workers if workers > 1 else 0


@dataclass
class Cluster:
    """N worker processes on one cluster id of the shared broker."""

    workers: int
    settings: BusSettings
    label: str = ""
    stack: Stack = field(default_factory=Stack)

    @property
    def name(self) -> str:
        plural = f"{self.workers} worker" + ("s" if self.workers > 1 else "")
        return f"{self.label} {plural}" if self.label else plural


def start_cluster(
    workers: int, broker: LocalBroker, shards: Path, log_dir: Path, tree: Tree | None = None
) -> Cluster:
    """Start ``workers`` worker processes (1 torch thread each) on cluster ``tp-n{workers}``
    (``tp-LABEL-n{workers}`` for a ``tree``, whose source the workers then run)."""
    label = tree.label if tree else ""
    settings = BusSettings(broker_url=broker.url, cluster=f"tp-{label}-n{workers}" if label
                           else f"tp-n{workers}")  # fmt: skip
    cluster = Cluster(workers, settings, label)
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree.path)}
    for index in range(workers):
        node = node_id(workers, index)
        command = [sys.executable, "-m", "services.worker", "--node-id", node, "--shards", str(shards),
                   "--broker", broker.url, "--cluster", settings.cluster, "--threads", "1",
                   "--log-level", "WARNING"]  # fmt: skip
        log_file = log_dir / f"{label}n{workers}-{node}.log"
        cluster.stack.logs[node] = log_file
        with open(log_file, "ab") as log:
            cluster.stack.workers[node] = subprocess.Popen(
                command, stdout=log, stderr=log, start_new_session=True, env=env,
                cwd=None if tree is None else tree.path,
            )
    return cluster


async def publish_even_plan(cluster: Cluster, num_layers: int, model_id: str) -> Plan:
    """Sign and publish the even split over the cluster's workers; wait for every READY."""
    segments = tuple(
        Segment(node=node_id(cluster.workers, index), start=start, end=end)  # type: ignore[arg-type]
        for index, (start, end) in enumerate(even_segments(num_layers, cluster.workers))
    )
    entry = node_id(cluster.workers, 0)
    plan = Plan(epoch=1, model_id=model_id, entry_node=entry, segments=segments)  # type: ignore[arg-type]
    plan = plan.sign(control_key(cluster.settings) or "")  # the workers' (development) key
    async with Bus(cluster.settings) as bus:
        await publish_plan_and_wait(bus, plan, cluster.stack, timeout_s=300.0)
    return plan


async def generate_remote(
    cluster: Cluster, prompt_ids: Sequence[int], tokens: int
) -> tuple[RequestFinished, list[float]]:
    """One greedy request straight to the cluster's entry node over the bus (no client-side
    resubmission logic in the measured path); also the send time (s) and then the arrival
    time of each TokenGenerated here. Raises ServingError for a RequestFailed, NoAnswer after 300 s."""
    arrivals: list[float] = []
    async with Bus(cluster.settings) as bus:
        message = GenerateRequest(request_id=secrets.token_hex(8), reply_to=bus.origin,  # type: ignore[arg-type]
                                  token_ids=tuple(prompt_ids), max_new_tokens=tokens, timeout_s=300.0)  # fmt: skip
        async with bus.subscribe(REPLIES, client=bus.origin) as replies:
            arrivals.append(time.perf_counter())
            await bus.publish(REQUESTS, message, node=node_id(cluster.workers, 0))
            try:
                async with asyncio.timeout(300.0):
                    async for _, reply in replies:
                        if reply.request_id != message.request_id:
                            continue
                        if isinstance(reply, TokenGenerated):
                            arrivals.append(time.perf_counter())
                        elif isinstance(reply, RequestFinished):
                            return reply, arrivals
                        else:
                            raise ServingError(f"request failed: {reply}")
            except TimeoutError:
                pass
    raise NoAnswer(f"no answer from {node_id(cluster.workers, 0)} within 300 s")


@dataclass(frozen=True)
class Run:
    """One generation: tokens and timings in seconds. ``steps_s`` are the intervals
    between consecutive tokens (robust to a burst of machine noise: take their median)."""

    token_ids: tuple[int, ...]
    ttft_s: float
    tpot_s: float
    steps_s: tuple[float, ...]

    @property
    def step_s(self) -> float:
        """Median interval between tokens (TPOT when only one token came)."""
        return statistics.median(self.steps_s) if self.steps_s else self.tpot_s


def intervals(times: Sequence[float]) -> tuple[float, ...]:
    """Differences between consecutive times."""
    return tuple(later - earlier for earlier, later in pairwise(times))


class Baseline:
    """The unsplit model in this process, run on a compute thread like a worker's (1 thread)."""

    def __init__(self, store: ShardStore) -> None:
        self.pipeline = LocalPipeline(store)
        self.compute = ComputeThread(threads=1)

    def _generate(self, prompt: list[int], tokens: int) -> Run:
        times: list[float] = []
        result = self.pipeline.generate(
            prompt, tokens, on_token=lambda _: times.append(time.perf_counter())
        )
        return Run(result.token_ids, result.ttft_s, result.tpot_s, intervals(times))

    async def generate(self, prompt: list[int], tokens: int) -> Run:
        return await self.compute.run(self._generate, prompt, tokens)


async def one_run(
    variant: str, baseline: Baseline, clusters: dict[str, Cluster], prompt: list[int], tokens: int
) -> Run:
    if variant == LOCAL:
        return await baseline.generate(prompt, tokens)
    finished, (sent, *arrivals) = await generate_remote(clusters[variant], prompt, tokens)
    run = Run(tuple(finished.token_ids), finished.ttft_s, finished.tpot_s, intervals(arrivals))
    if len(arrivals) > 1 and finished.tpot_s == 0.0:  # the entry's timings are broken
        print(f"  warning: {variant}: RequestFinished says TTFT {finished.ttft_s * 1e3:.2f} ms, "
              "TPOT 0 for several tokens; using this client's clock", file=sys.stderr)  # fmt: skip
        tpot_s = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
        run = Run(run.token_ids, arrivals[0] - sent, tpot_s, run.steps_s)
    return run


async def measure(
    baseline: Baseline,
    clusters: dict[str, Cluster],
    prompt: list[int],
    tokens: int,
    repeats: int,
) -> dict[str, list[Run]]:
    """Warm each variant up, then ``repeats`` interleaved rounds in a rotating order."""
    variants = [LOCAL, *clusters]
    for variant in variants:
        await one_run(variant, baseline, clusters, prompt, 2)
    runs: dict[str, list[Run]] = {variant: [] for variant in variants}
    for round_index in range(repeats):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            run = await one_run(variant, baseline, clusters, prompt, tokens)
            runs[variant].append(run)
            step_ms = run.step_s * 1e3
            print(f"  round {round_index + 1}/{repeats} {variant:>17}: TPOT {run.tpot_s * 1e3:6.2f} ms, "
                  f"step p50 {step_ms:6.2f} ms",
                  file=sys.stderr, flush=True)  # fmt: skip
    return runs


async def round_trips(broker: LocalBroker, samples: int) -> list[tuple[str, list[float]]]:
    """Bus round trips (publish, broker, receive, decode) of frames and a QoS 1 control message."""
    settings = BusSettings(broker_url=broker.url, cluster="tp-rtt")
    rows = []
    async with Bus(settings, origin="bench") as bus:
        for label, size in RTT_SIZES_BYTES.items():
            rows.append((f"frame {label} (QoS 0)", await frame_round_trips(bus, size, samples)))
        rows.append(("control msg (QoS 1)", await control_round_trips(bus, samples)))
    return rows


@dataclass(frozen=True)
class Row:
    """One variant's summary in ms: medians over rounds, and ``step_ms``, the least
    disturbed round's median interval between tokens (machine noise only adds time)."""

    variant: str
    workers: int
    ttft_ms: float
    tpot_ms: float
    tpot_range_ms: tuple[float, float]
    step_ms: float

    @classmethod
    def of(cls, variant: str, workers: int, results: list[Run]) -> Row:
        tpots = [run.tpot_s * 1e3 for run in results]
        return cls(variant, workers, statistics.median(run.ttft_s for run in results) * 1e3,
                   statistics.median(tpots), (min(tpots), max(tpots)),
                   min(run.step_s for run in results) * 1e3)  # fmt: skip


def summarize(runs: dict[str, list[Run]], clusters: dict[str, Cluster]) -> list[Row]:
    return [Row.of(variant, clusters[variant].workers if variant in clusters else 0, results)
            for variant, results in runs.items()]  # fmt: skip


def per_hop_ms(row: Row, local: Row) -> tuple[float, float] | None:
    """(TPOT delta, median-step delta) divided by the row's hops; None without hops."""
    count = hops(row.workers)
    if not count:
        return None
    return (row.tpot_ms - local.tpot_ms) / count, (row.step_ms - local.step_ms) / count


def report(rows: list[Row]) -> bool:
    """Print the table and the goals; True when both goals are met on both measures."""
    local = rows[0]
    print(f"{'variant':<17}{'hops':>5}{'TTFT':>8}{'TPOT':>8}{'(min-max)':>15}{'x local':>8}"
          f"{'best':>9}{'x local':>8}{'ms/hop TPOT':>12}{'best':>7}")  # fmt: skip
    for row in rows:
        line = (f"{row.variant:<17}{hops(row.workers) if row.workers else '-':>5}"
                f"{row.ttft_ms:>8.1f}{row.tpot_ms:>8.2f}"
                f"{f'({row.tpot_range_ms[0]:.1f}-{row.tpot_range_ms[1]:.1f})':>15}"
                f"{row.tpot_ms / local.tpot_ms:>8.3f}{row.step_ms:>9.2f}{row.step_ms / local.step_ms:>8.3f}")  # fmt: skip
        overhead = per_hop_ms(row, local)
        if overhead is not None:
            line += f"{overhead[0]:>12.2f}{overhead[1]:>7.2f}"
        elif row.workers:
            line += (f"{row.tpot_ms - local.tpot_ms:>+12.2f}{row.step_ms - local.step_ms:>+7.2f}"
                     "  (no hop: fixed cost)")  # fmt: skip
        print(line)
    print("(ms; TTFT, TPOT: medians over rounds of the entry's RequestFinished; best: the lowest "
          "over rounds of the median interval between tokens)")  # fmt: skip
    low, high = local.tpot_range_ms
    print(f"noise: local TPOT ranged {low:.1f}-{high:.1f} ms over the rounds "
          f"({(high - low) / local.tpot_ms:.0%} of its median)")  # fmt: skip
    return goals(rows)


def goals(rows: list[Row]) -> bool:
    local, met = rows[0], True
    overheads = [o for o in (per_hop_ms(row, local) for row in rows) if o is not None]
    if overheads:
        worst = (max(o[0] for o in overheads), max(o[1] for o in overheads))
        ok = max(worst) <= DECODE_GOAL_MS_PER_HOP
        met &= ok
        print(f"goal: decode <= {DECODE_GOAL_MS_PER_HOP} ms per hop: worst {worst[0]:.2f} (TPOT), "
              f"{worst[1]:.2f} (best) -> {'met' if ok else 'NOT met'}")  # fmt: skip
    width, limit = WIDTH_GOAL
    row = next((row for row in rows if row.workers == width), None)
    if row is not None:
        ratios = (row.tpot_ms / local.tpot_ms, row.step_ms / local.step_ms)
        ok = max(ratios) <= limit
        met &= ok
        print(f"goal: {width} workers within {limit:.2f} x of one process: {ratios[0]:.3f} x (TPOT), "
              f"{ratios[1]:.3f} x (best) -> {'met' if ok else 'NOT met'}")  # fmt: skip
    return met


def report_trees(runs: dict[str, list[Run]], trees: list[Tree], widths: list[int]) -> None:
    """Per width, each tree's TPOT against the first tree's, paired round by round (both
    ran in the same round, seconds apart, so the machine's slow and fast spells cancel)."""
    base = trees[0]
    for tree in trees[1:]:
        for width in widths:
            plural = f"{width} worker" + ("s" if width > 1 else "")
            ours, theirs = runs[f"{tree.label} {plural}"], runs[f"{base.label} {plural}"]
            ratios = sorted(a.tpot_s / b.tpot_s for a, b in zip(ours, theirs, strict=True))
            steps = sorted(a.step_s / b.step_s for a, b in zip(ours, theirs, strict=True))
            print(f"{tree.label} / {base.label}, {plural}: TPOT x {statistics.median(ratios):.3f} "
                  f"(median of {len(ratios)} paired rounds; mean {statistics.mean(ratios):.3f}, "
                  f"range {ratios[0]:.3f}-{ratios[-1]:.3f}), median step x "
                  f"{statistics.median(steps):.3f}")  # fmt: skip


def report_round_trips(rows: list[tuple[str, list[float]]]) -> None:
    print(f"{'bus round trip':<30}{'p50 ms':>9}{'p99 ms':>9}")
    for label, times in rows:
        print(
            f"{label:<30}{percentile(times, 0.5) * 1e3:>9.3f}{percentile(times, 0.99) * 1e3:>9.3f}"
        )


def same_tokens(runs: dict[str, list[Run]]) -> bool:
    """True when every run of every variant produced the local tokens."""
    expected = runs[LOCAL][0].token_ids
    bad = [(variant, index) for variant, results in runs.items()
           for index, run in enumerate(results) if run.token_ids != expected]  # fmt: skip
    for variant, index in bad:
        print(f"TOKENS DIFFER: {variant} round {index + 1}: {runs[variant][index].token_ids} "
              f"!= local {expected}")  # fmt: skip
    return not bad


async def bench(args: argparse.Namespace, broker: LocalBroker, shards: Path, log_dir: Path) -> bool:
    store = ShardStore(shards)
    baseline = Baseline(store)
    prompt = baseline.pipeline.tokenizer.encode(PROMPT)
    num_layers = store.config.num_layers
    clusters: dict[str, Cluster] = {}
    try:
        for tree in args.trees or [None]:
            for workers in args.workers:
                cluster = start_cluster(workers, broker, shards, log_dir, tree)
                clusters[cluster.name] = cluster
        for cluster in clusters.values():
            await publish_even_plan(cluster, num_layers, shards.name)
        layouts = {name: even_segments(num_layers, c.workers) for name, c in clusters.items()}
        print(f"model {shards} ({num_layers} blocks), prompt {len(prompt)} tokens, {args.tokens} new "
              f"tokens, {args.repeats} rounds, 1 torch thread per process; splits {layouts}; "
              f"worker logs in {log_dir}")  # fmt: skip
        started = time.perf_counter()
        runs = await measure(baseline, clusters, prompt, args.tokens, args.repeats)
        print(f"measured in {time.perf_counter() - started:.0f} s; greedy continuation "
              f"{baseline.pipeline.tokenizer.decode(list(runs[LOCAL][0].token_ids))!r}")  # fmt: skip
        same = same_tokens(runs)
        report(summarize(runs, clusters))
        if len(args.trees) > 1:
            report_trees(runs, args.trees, args.workers)
    finally:
        for cluster in clusters.values():
            cluster.stack.stop()
        baseline.compute.close()
    report_round_trips(await round_trips(broker, args.rtt_samples))
    return same


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per run (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--workers", default="1,2,3,4", help="pipeline widths (default 1,2,3,4)")
    parser.add_argument("--rtt-samples", type=int, default=200, help="bus round trips per size")
    parser.add_argument("--model", default="smollm2", help="packaged model name or folder")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                        help="measure the workers of the source tree PATH (a git worktree) as "
                             "variants 'LABEL N workers'; repeat for side-by-side comparisons "
                             "(default: this tree only)")  # fmt: skip
    args = parser.parse_args(argv)
    args.trees = []
    for spec in args.tree:
        label, _, path = spec.partition("=")
        if not label.isidentifier() or not (Path(path) / "services" / "worker").is_dir():
            parser.error(f"--tree {spec!r}: want LABEL=PATH, PATH a source tree with services/worker")
        args.trees.append(Tree(label, Path(path).resolve()))
    try:
        args.workers = sorted({int(part) for part in args.workers.split(",")})
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, not {args.workers!r}")
    if args.tokens < 2 or args.repeats < 1 or not args.workers or min(args.workers) < 1:
        parser.error("need --tokens >= 2, --repeats >= 1 and worker counts >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner: Callable[..., bool] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run  # the event loop the workers use (shared.process.run_service)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    try:
        model_dir = prepare_model(args.model, progress=lambda line: print(line, file=sys.stderr))
        shards = ensure_shards(model_dir, default_models_dir() / f"{model_dir.name}-shards")
        logs = Path(tempfile.mkdtemp(prefix="es-transport-"))
        with start_local_broker() as broker:
            same = runner(bench(args, broker, shards, logs))
    except EdgesplitError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        found = first_edgesplit_error(group)
        if found is None:
            raise
        print(f"bench: {found}", file=sys.stderr)
        return 1
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
