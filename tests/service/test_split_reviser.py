"""The split reviser service on a real Mosquitto: a request built from a live profile
(real worker statuses, topology numbers) gets the plan `edgesplit plan` gives for the
same problem written to a file; bad requests get typed answers and the service goes on."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiomqtt
import pytest

from services.split_reviser.service import ReviserSettings, SplitReviserService
from services.worker.__main__ import parse_args as worker_args
from services.worker.__main__ import settings_from as worker_settings
from services.worker.service import WorkerService
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import (
    CapacityProfile,
    LinkCapacity,
    NodeCapacity,
    NodeStatus,
    PlanOption,
    PlanProposed,
    PlanRequested,
)
from shared.model.shard import ShardStore, write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.planning.live import problem_from_profile, problem_to_json
from shared.planning.problem import Problem
from shared.planning.solver import solve
from shared.topics import REVISER_REPLIES, REVISER_REQUESTS
from shared.topology import DEFAULT_TOPOLOGY, load_topology

ROOT = Path(__file__).resolve().parents[2]
EDGESPLIT = ROOT / ".venv" / "bin" / "edgesplit"
BASE_FLOPS_PER_S = 2e7  # full speed (scaled by the topology's speed): slow enough that
# compute matters next to the links, so the two objectives pick different plans
UTILISATION = {"car": 0.1, "rsu": 0.3, "mec": 0.6}
REPLY_TIMEOUT_S = 10.0


def run(main: Callable[[], Awaitable[None]], timeout_s: float = 30.0) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(timeout_s):
            await main()

    asyncio.run(guarded())


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reviser")
    write_tiny_checkpoint("llama", root / "ckpt", layers=6, seed=0)
    write_shards(root / "ckpt", root / "shards", model_name="tiny-llama")
    return root / "shards"


def worker_status(node: str, shards: Path, *extra: str) -> tuple[NodeStatus, float]:
    """A real worker's retained status (from the default topology) and its slowdown."""
    settings = worker_settings(worker_args(["--node-id", node, "--shards", str(shards),
                                            "--topology", str(DEFAULT_TOPOLOGY), *extra]))  # fmt: skip
    worker = WorkerService(settings)
    try:
        return worker.status(), settings.slowdown
    finally:
        worker.compute.close()


def live_profile(shards: Path) -> CapacityProfile:
    """The default topology's nodes (car with room for 3 blocks only, so the plan spreads)
    and links, plus a fast trusted node that has just gone down."""
    block_bytes = max(b.bytes for b in ShardStore(shards).manifest.blocks)
    nodes = []
    for node in load_topology().nodes:
        extra = ("--memory-bytes", str(int(3.5 * block_bytes))) if node.id == "car" else ()
        status, slowdown = worker_status(node.id, shards, *extra)
        nodes.append(NodeCapacity(node=status.node, alive=status.state == "online", trust=status.trust,
                                  memory_free_bytes=status.memory_bytes,
                                  flops_per_s=BASE_FLOPS_PER_S / slowdown,
                                  utilisation=UTILISATION[status.node]))  # fmt: skip
    gone = NodeStatus(node="spare", state="offline", trust=2, memory_bytes=10**9, threads=1)  # type: ignore[arg-type]
    nodes.append(NodeCapacity(node=gone.node, alive=False, trust=2, memory_free_bytes=gone.memory_bytes,
                              flops_per_s=1e12, utilisation=0.0))  # fmt: skip
    links = [LinkCapacity(src=src, dst=dst, bandwidth_bytes_per_s=link.bandwidth_bytes_per_s,  # type: ignore[arg-type]
                          latency_s=link.latency_s)
             for (src, dst), link in load_topology().directed_links().items()]  # fmt: skip
    links += [LinkCapacity(src=a, dst=b, bandwidth_bytes_per_s=1e9, latency_s=1e-4)  # type: ignore[arg-type]
              for a, b in (("car", "spare"), ("spare", "car"))]  # fmt: skip
    return CapacityProfile(as_of_s=1.7e9, nodes=tuple(nodes), links=tuple(links))


def plan_request(request_id: str, profile: CapacityProfile, **fields: object) -> PlanRequested:
    topology = load_topology()
    values: dict[str, object] = {
        "request_id": request_id, "reply_to": "orchestrator", "model_id": "tiny-llama",
        "source": topology.entry_node().id, "profile": profile, "alternatives": 4,
        "privacy": topology.privacy_policy(),
        "context_tokens": 64, **fields,
    }  # fmt: skip
    return PlanRequested(**values)  # type: ignore[arg-type]


def same_problem(request: PlanRequested, shards: Path) -> Problem:
    return problem_from_profile(request.profile, ShardStore(shards).manifest, request.privacy, request.objective,
                                source=request.source, context_tokens=request.context_tokens)  # fmt: skip


async def exchange(broker: LocalBroker, cluster: str, shards: Path,
                   requests: list[PlanRequested]) -> tuple[dict[str, PlanProposed], SplitReviserService]:  # fmt: skip
    """Start the service, send garbage and then each request, collect one answer each."""
    settings = ReviserSettings(broker_url=broker.url, cluster=cluster, shards_dir=shards,
                               connect_timeout_s=3.0, client_id="reviser")  # fmt: skip
    service = SplitReviserService(settings)
    answers: dict[str, PlanProposed] = {}
    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(service.run())
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            await service.ready.wait()
        client = BusSettings(broker_url=broker.url, cluster=cluster, connect_timeout_s=3.0)
        async with Bus(client, origin="orchestrator") as bus, \
                bus.subscribe(REVISER_REPLIES, client="orchestrator") as replies:  # fmt: skip
            async with aiomqtt.Client("127.0.0.1", broker.port) as raw:
                await raw.publish(REVISER_REQUESTS.topic(cluster), b"\x93not a request", qos=1)
            for request in requests:
                await bus.publish(REVISER_REQUESTS, request)
                async with asyncio.timeout(REPLY_TIMEOUT_S):
                    _, answer = await replies.get()
                answers[answer.request_id] = answer
        running.cancel()
    return answers, service


def cli_plan(problem: Problem, folder: Path, objective: str) -> dict:
    file = folder / "problem.json"
    file.write_text(json.dumps(problem_to_json(problem)))
    done = subprocess.run([str(EDGESPLIT), "plan", str(file), "--json", "--objective", objective],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return json.loads(done.stdout)


def triples(segments: tuple) -> list[tuple[str, int, int]]:
    return [(segment.node, segment.start, segment.end) for segment in segments]


def assert_matches_cli(option: PlanOption, cli: dict) -> None:
    assert cli["feasible"] is True
    assert triples(option.segments) == [(s["node"], s["start"], s["end"]) for s in cli["segments"]]
    assert option.latency_s == pytest.approx(cli["predicted"]["latency_s"], rel=1e-9, abs=0)
    assert option.bottleneck_s == pytest.approx(cli["predicted"]["bottleneck_s"], rel=1e-9, abs=0)


def assert_sorted_and_distinct(answer: PlanProposed) -> None:
    assert answer.best is not None
    options = [answer.best, *answer.alternatives]
    assert len(options) == 5 and len({option.segments for option in options}) == 5
    keys: list[tuple[float, ...]] = [
        (o.latency_s,) if answer.objective == "latency" else (o.bottleneck_s, o.latency_s) for o in options]
    assert keys == sorted(keys)


def test_reviser_answers_live_requests_like_edgesplit_plan(
    broker: LocalBroker, cluster: str, shards: Path, tmp_path: Path
) -> None:
    profile = live_profile(shards)
    good = [plan_request("lat", profile), plan_request("thr", profile, objective="throughput")]
    bad = [plan_request("wrong-model", profile, model_id="gpt-9"),
           plan_request("source-down", profile, source="spare")]  # fmt: skip
    answers: dict[str, PlanProposed] = {}

    async def main() -> None:
        found, service = await exchange(broker, cluster, shards, [*bad, *good])
        answers.update(found)
        assert service.counters == {"invalid_request": 2, "feasible": 2}

    run(main)
    for request_id, reason in (("wrong-model", "model_id: 'gpt-9'"), ("source-down", "'spare' is down")):
        refused = answers[request_id]
        assert (refused.feasible, refused.error, refused.best) == (False, "invalid_request", None)
        assert reason in refused.reason
    assert answers["lat"].best != answers["thr"].best  # the objective reaches the solver
    for request, objective in zip(good, ("latency", "throughput"), strict=True):
        answer = answers[request.request_id]
        assert answer.feasible and answer.error is None and answer.objective == objective
        assert answer.profile_as_of_s == profile.as_of_s and answer.method == "exact" and answer.optimal
        problem = same_problem(request, shards)
        assert_matches_cli(answer.best, cli_plan(problem, tmp_path, objective))  # type: ignore[arg-type]
        assert_sorted_and_distinct(answer)
        expected = solve(problem, alternatives=4)
        assert [triples(o.segments) for o in answer.alternatives] == [
            triples(alt.segments) for alt in expected.alternatives]
        used = {segment.node for o in (answer.best, *answer.alternatives) for segment in o.segments}  # type: ignore[union-attr]
        assert "spare" not in used and len(answer.best.segments) >= 2  # type: ignore[union-attr]
        assert all(s.node == "car" for s in answer.best.segments if s.start < 2)  # type: ignore[union-attr]


def test_a_request_past_its_deadline_gets_a_timeout_answer(shards: Path) -> None:
    settings = ReviserSettings(shards_dir=shards, solve_timeout_s=1e-6)
    service = SplitReviserService(settings)
    service.manifest = ShardStore(shards).manifest
    request = plan_request("slow", live_profile(shards))

    async def main() -> None:
        answer = await service.answer(request)
        assert (answer.feasible, answer.error) == (False, "timeout")
        assert "deadline" in answer.reason

    run(main, timeout_s=10.0)
