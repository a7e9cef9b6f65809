"""Cost of the data plane: SmolLM2 unsplit in one process vs split over 1-4 worker processes.

Starts its own Mosquitto, prepares SmolLM2 and its shard store (cached under the models
dir), and starts one cluster of real worker processes per pipeline width N (``python -m
services.worker ... --threads 1``, no emulated links or slowdown, so a hop costs only
software). Each cluster gets a signed plan cutting the blocks evenly over its N workers
(``nNw0`` is the entry and holds the first segment). Greedy requests go through
``services.client``; TTFT and TPOT come from the entry's RequestFinished. The baseline is
``LocalPipeline`` in this process with one torch thread (each worker uses one too).

Variants are interleaved, ``--repeats`` rounds in a rotating order, after a warm-up; the
table shows medians and the per-hop overhead, where a hop is one activation frame sent
per decode step (N frames for N >= 2 workers, none for N = 1). It ends with raw bus
round trips of a decode-sized (2.3 KB) and a prefill-sized (300 KB) frame.

    .venv/bin/python -m bench.transport [--tokens 32] [--repeats 5] [--workers 1,2,3,4]

Exit status 1 when a distributed run's tokens differ from the local ones.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.wire import control_round_trips, frame_round_trips, percentile
from services.client import ClientOptions, request
from services.launcher import Stack, ensure_shards, publish_plan_and_wait
from services.worker.compute import ComputeThread
from shared.broker import LocalBroker, start_local_broker
from shared.bus import Bus
from shared.config import BusSettings
from shared.errors import EdgesplitError
from shared.messages import GenerateRequest, Plan, RequestFinished, Segment
from shared.model.pipeline import LocalPipeline
from shared.model.prepare import default_models_dir, prepare_model
from shared.model.shard import ShardStore
from shared.process import first_edgesplit_error

PROMPT = "The capital of France is Paris. The capital of Germany is"
DECODE_GOAL_MS_PER_HOP = 1.5
WIDTH_GOAL = (3, 1.10)  # 3 workers within 1.10 x of one process
RTT_SIZES_BYTES = {"decode 2.3 KB": 2304, "prefill 300 KB": 294_912}
LOCAL = "local"


def even_segments(num_layers: int, workers: int) -> list[tuple[int, int]]:
    """[start, end) block ranges splitting ``num_layers`` over ``workers`` as evenly as possible."""
    if not 1 <= workers <= num_layers:
        raise EdgesplitError(f"cannot split {num_layers} blocks over {workers} workers")
    bounds = [index * num_layers // workers for index in range(workers + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def node_id(workers: int, index: int) -> str:
    """Worker ids unique on the shared broker: MQTT client ids derive from node ids, not
    from the cluster, so ``w0`` in two clusters would kick each other off."""
    return f"n{workers}w{index}"


def hops(workers: int) -> int:
    """Activation frames sent per decode step: w0 -> w1 -> ... -> w(N-1) -> w0."""
    return workers if workers > 1 else 0


@dataclass
class Cluster:
    """N worker processes on one cluster id of the shared broker."""

    workers: int
    settings: BusSettings
    stack: Stack = field(default_factory=Stack)

    @property
    def name(self) -> str:
        return f"{self.workers} worker" + ("s" if self.workers > 1 else "")


def start_cluster(workers: int, broker: LocalBroker, shards: Path, log_dir: Path) -> Cluster:
    """Start ``workers`` worker processes (1 torch thread each) on cluster ``tp-n{workers}``."""
    settings = BusSettings(broker_url=broker.url, cluster=f"tp-n{workers}")
    cluster = Cluster(workers, settings)
    for index in range(workers):
        node = node_id(workers, index)
        command = [sys.executable, "-m", "services.worker", "--node-id", node, "--shards", str(shards),
                   "--broker", broker.url, "--cluster", settings.cluster, "--threads", "1",
                   "--log-level", "WARNING"]  # fmt: skip
        log_file = log_dir / f"n{workers}-{node}.log"
        cluster.stack.logs[node] = log_file
        with open(log_file, "ab") as log:
            cluster.stack.workers[node] = subprocess.Popen(
                command, stdout=log, stderr=log, start_new_session=True
            )
    return cluster


async def publish_even_plan(cluster: Cluster, num_layers: int, model_id: str) -> Plan:
    """Sign and publish the even split over the cluster's workers; wait for every READY."""
    segments = tuple(
        Segment(node=node_id(cluster.workers, index), start=start, end=end)  # type: ignore[arg-type]
        for index, (start, end) in enumerate(even_segments(num_layers, cluster.workers))
    )
    plan = Plan(
        epoch=1, model_id=model_id, entry_node=node_id(cluster.workers, 0), segments=segments
    )  # type: ignore[arg-type]
    plan = plan.sign(cluster.settings.plan_signing_key)
    async with Bus(cluster.settings) as bus:
        await publish_plan_and_wait(bus, plan, cluster.stack, timeout_s=300.0)
    return plan


async def generate_remote(
    cluster: Cluster, prompt_ids: Sequence[int], tokens: int
) -> RequestFinished:
    """One greedy request through the cluster's entry node."""

    def make(client: str) -> GenerateRequest:
        return GenerateRequest(request_id=secrets.token_hex(8), reply_to=client,  # type: ignore[arg-type]
                               token_ids=tuple(prompt_ids), max_new_tokens=tokens, timeout_s=300.0)  # fmt: skip

    result = await request(ClientOptions(cluster.settings, timeout_s=300.0), make)
    assert isinstance(result, RequestFinished)
    return result


@dataclass(frozen=True)
class Run:
    """One generation: tokens and timings in seconds."""

    token_ids: tuple[int, ...]
    ttft_s: float
    tpot_s: float


class Baseline:
    """The unsplit model in this process, run on a compute thread like a worker's (1 thread)."""

    def __init__(self, store: ShardStore) -> None:
        self.pipeline = LocalPipeline(store)
        self.compute = ComputeThread(threads=1)

    async def generate(self, prompt: list[int], tokens: int) -> Run:
        result = await self.compute.run(self.pipeline.generate, prompt, tokens)
        return Run(result.token_ids, result.ttft_s, result.tpot_s)


async def one_run(
    variant: str, baseline: Baseline, clusters: dict[str, Cluster], prompt: list[int], tokens: int
) -> Run:
    if variant == LOCAL:
        return await baseline.generate(prompt, tokens)
    finished = await generate_remote(clusters[variant], prompt, tokens)
    return Run(tuple(finished.token_ids), finished.ttft_s, finished.tpot_s)


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
            print(f"  round {round_index + 1}/{repeats} {variant:>10}: TPOT {run.tpot_s * 1e3:6.2f} ms",
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


def _ms(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max of seconds, in ms."""
    return statistics.median(values) * 1e3, min(values) * 1e3, max(values) * 1e3


def paired_per_hop_ms(runs: dict[str, list[Run]], variant: str, workers: int) -> list[float]:
    """Per-hop overhead in each round: (TPOT distributed - TPOT local of the same round) / hops."""
    return [(run.tpot_s - base.tpot_s) * 1e3 / hops(workers)
            for run, base in zip(runs[variant], runs[LOCAL], strict=True)]  # fmt: skip


def report(runs: dict[str, list[Run]], clusters: dict[str, Cluster]) -> bool:
    """Print the table and the goals; True when both goals are met."""
    local_tpot = statistics.median(run.tpot_s for run in runs[LOCAL]) * 1e3
    print(f"{'variant':<11}{'hops':>5}{'TTFT ms':>9}{'TPOT ms':>9}{'(min-max)':>16}"
          f"{'x local':>9}{'ms/hop':>8}{'(min-max)':>15}")  # fmt: skip
    per_hop: dict[int, float] = {}
    for variant, results in runs.items():
        ttft, _, _ = _ms([run.ttft_s for run in results])
        tpot, low, high = _ms([run.tpot_s for run in results])
        workers = clusters[variant].workers if variant in clusters else 0
        line = (f"{variant:<11}{hops(workers) if workers else '-':>5}{ttft:>9.1f}{tpot:>9.2f}"
                f"{f'({low:.1f}-{high:.1f})':>16}{tpot / local_tpot:>9.3f}")  # fmt: skip
        if hops(workers):
            paired = paired_per_hop_ms(runs, variant, workers)
            per_hop[workers] = statistics.median(paired)
            line += f"{per_hop[workers]:>8.2f}{f'({min(paired):.2f}-{max(paired):.2f})':>15}"
        elif workers:
            line += f"{'+' + format(tpot - local_tpot, '.2f'):>8}{'(fixed, 0 hop)':>15}"
        print(line)
    return goals(runs, clusters, per_hop, local_tpot)


def goals(
    runs: dict[str, list[Run]],
    clusters: dict[str, Cluster],
    per_hop: dict[int, float],
    local_ms: float,
) -> bool:
    met = True
    if per_hop:
        worst = max(per_hop.values())
        ok = worst <= DECODE_GOAL_MS_PER_HOP
        met &= ok
        print(f"goal: decode overhead <= {DECODE_GOAL_MS_PER_HOP} ms per hop: worst {worst:.2f} ms "
              f"-> {'met' if ok else 'NOT met'}")  # fmt: skip
    width, limit = WIDTH_GOAL
    name = next((name for name, cluster in clusters.items() if cluster.workers == width), None)
    if name is not None:
        ratio = statistics.median(run.tpot_s for run in runs[name]) * 1e3 / local_ms
        ok = ratio <= limit
        met &= ok
        print(f"goal: {width} workers within {limit:.2f} x of one process: {ratio:.3f} x "
              f"-> {'met' if ok else 'NOT met'}")  # fmt: skip
    return met


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
        for workers in args.workers:
            cluster = start_cluster(workers, broker, shards, log_dir)
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
        report(runs, clusters)
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
    args = parser.parse_args(argv)
    try:
        args.workers = sorted({int(part) for part in args.workers.split(",")})
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, not {args.workers!r}")
    if args.tokens < 2 or args.repeats < 1 or not args.workers or min(args.workers) < 1:
        parser.error("need --tokens >= 2, --repeats >= 1 and worker counts >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
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
