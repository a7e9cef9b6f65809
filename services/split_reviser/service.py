"""The split reviser service: answers plan requests over MQTT.

It loads the served model's shard manifest once, subscribes to `REVISER_REQUESTS`,
and for each `PlanRequested` builds the planning problem from the request's live
capacity profile (``live.problem_from_profile``: the same `Problem` a file gives
``edgesplit plan``), solves it on a worker thread under a deadline, and publishes a
`PlanProposed` (best plan, alternatives, predicted latency, bottleneck and migration
cost) on the requester's `REVISER_REPLIES` topic. A request that cannot be planned
(unknown model, source down, a profile the problem rejects, a timeout, a solver
failure) gets a typed answer (``feasible`` false, ``error`` and ``reason``); one bad
request never stops the service.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from pathlib import Path

from pydantic import Field

from shared.bus import Bus
from shared.config import BusSettings
from shared.errors import EdgesplitError
from shared.messages import PlanOption, PlanProposed, PlanRequested, Segment
from shared.metrics import ServiceMetrics, message_readings
from shared.model.manifest import ShardManifest
from shared.model.shard_files import ShardFiles
from shared.planning.live import LiveProfileError, problem_from_profile
from shared.planning.objectives import ObjectiveWeights, objective_terms
from shared.planning.problem import Placement, Problem
from shared.planning.solver import PlanResult, solve
from shared.security.reporting import report_refusals
from shared.topics import REVISER_REPLIES, REVISER_REQUESTS

log = logging.getLogger(__name__)
REASON_CHARS = 1024  # PlanProposed.reason is a ShortText


class ReviserSettings(BusSettings):
    """The split reviser process. Units in field names."""

    shards_dir: Path = Field(description="shard store of the served model (`edgesplit shard`)")
    solve_timeout_s: float = Field(default=10.0, gt=0, description="deadline for one request")
    max_parallel_solves: int = Field(default=1, ge=1, le=16,
                                     description="requests solved at once (each on its own thread)")  # fmt: skip


class SplitReviserService:
    """Constructor does no I/O; ``run()`` serves until cancelled.

    ``ready`` is set once the manifest is loaded and the broker confirmed the request
    subscription; ``counters`` counts answers by outcome.
    """

    def __init__(self, settings: ReviserSettings) -> None:
        self.settings = settings
        self.manifest: ShardManifest | None = None
        self.ready = asyncio.Event()
        self.counters: Counter[str] = Counter()
        self._origin = settings.client_id or f"split-reviser-{secrets.token_hex(4)}"
        self.metrics = ServiceMetrics("split-reviser", ("proposals",))

    async def run(self) -> None:
        """Load the manifest, then answer requests until cancelled.

        Raises:
            CheckpointError: the shard store's manifest is missing or invalid.
            BrokerUnavailable: no broker answered.
        """
        store = await asyncio.to_thread(ShardFiles, self.settings.shards_dir)
        self.manifest = store.manifest
        async with (self.metrics.served(self.settings), Bus(self.settings, origin=self._origin) as bus,
                    asyncio.TaskGroup() as tasks):  # fmt: skip
            self.metrics.add_reader(lambda: message_readings(bus.counters))
            tasks.create_task(self._serve(bus, tasks), name="plan-requests")
            # no refusals to count: the retained status is its heartbeat (`edgesplit health`)
            tasks.create_task(report_refusals(bus, self.settings.client_id or "split-reviser", dict),
                              name="status")  # fmt: skip

    async def _serve(self, bus: Bus, tasks: asyncio.TaskGroup) -> None:
        slots = asyncio.Semaphore(self.settings.max_parallel_solves)
        async with bus.subscribe(REVISER_REQUESTS) as requests:
            self.ready.set()
            assert self.manifest is not None
            log.info("split reviser ready: model %s (%d blocks), cluster %s",
                     self.manifest.model_name, self.manifest.num_blocks, bus.cluster)  # fmt: skip
            async for _, request in requests:
                await slots.acquire()  # bounds the work in flight; the queue holds the rest
                tasks.create_task(self._handle(bus, request, slots), name=f"plan-{request.request_id}")

    async def _handle(self, bus: Bus, request: PlanRequested, slots: asyncio.Semaphore) -> None:
        try:
            answer = await self.answer(request)
            outcome = answer.error or ("feasible" if answer.feasible else "infeasible")
            self.counters[outcome] += 1
            self.metrics.proposals.labels(outcome).inc()
            await bus.publish(REVISER_REPLIES, answer, client=request.reply_to)
        except EdgesplitError as error:  # BusError: broker gone past the publish deadline
            self.counters["unsent"] += 1
            log.warning("answer to plan request %s not sent: %s", request.request_id, error)
        finally:
            slots.release()

    async def answer(self, request: PlanRequested) -> PlanProposed:
        """Plan one request on a worker thread within ``solve_timeout_s``; never raises
        for a bad request (the answer says what went wrong)."""
        assert self.manifest is not None, "run() loads the manifest first"
        started = time.perf_counter()
        timeout_s = self.settings.solve_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.to_thread(propose, request, self.manifest)
        except TimeoutError:
            # The thread cannot be interrupted; it finishes in the background.
            return refusal(request, "timeout", f"no plan within the reviser's {timeout_s:g} s deadline",
                           time.perf_counter() - started)  # fmt: skip
        except Exception as error:  # one bad request must never stop the service
            log.exception("plan request %s failed", request.request_id)
            return refusal(request, "internal", f"{type(error).__name__}: {error}",
                           time.perf_counter() - started)  # fmt: skip


def refusal(request: PlanRequested, error: str, reason: str, solve_s: float) -> PlanProposed:
    """The answer to a request that could not be planned."""
    return PlanProposed(
        request_id=request.request_id, feasible=False, reason=reason[:REASON_CHARS],
        error=error, objective=request.objective, solve_s=solve_s,  # type: ignore[arg-type]
        profile_as_of_s=request.profile.as_of_s,
    )  # fmt: skip


def problem_for(request: PlanRequested, manifest: ShardManifest) -> Problem:
    """The planning problem a request describes (pure).

    Raises:
        LiveProfileError: the model is not the one served, or the profile cannot be
            turned into a problem (see ``live.problem_from_profile``).
    """
    if request.model_id != manifest.model_name:
        raise LiveProfileError(
            f"model_id: {request.model_id!r} is not served by this reviser (it plans "
            f"{manifest.model_name!r})"
        )
    problem = problem_from_profile(
        request.profile, manifest, request.privacy, request.objective, source=request.source,
        context_tokens=request.context_tokens, concurrent_requests=request.concurrent_requests,
        expected_batch=request.expected_batch,
    )  # fmt: skip
    if request.precision is None:
        return problem
    return problem.model_copy(update={"precision": request.precision})


def propose(request: PlanRequested, manifest: ShardManifest) -> PlanProposed:
    """Build the problem, solve it and shape the answer (pure, CPU-bound: run it on a
    thread). A request that cannot be planned becomes an ``invalid_request`` answer."""
    started = time.perf_counter()
    try:
        problem = problem_for(request, manifest)
        weights = ObjectiveWeights(**request.weights.model_dump())
        current = Placement.of(*((s.node, s.start, s.end) for s in request.current_segments))
        result = solve(problem, weights=weights, current_placement=current,
                       alternatives=request.alternatives, method=request.method,
                       time_limit_s=request.time_limit_s)  # fmt: skip
    except EdgesplitError as error:
        return refusal(request, "invalid_request", str(error), time.perf_counter() - started)
    return proposal(request, problem, result, weights, current, time.perf_counter() - started)


def proposal(
    request: PlanRequested, problem: Problem, result: PlanResult, weights: ObjectiveWeights,
    current: Placement, solve_s: float,
) -> PlanProposed:
    """A solver result as the wire answer; each plan's migration cost is counted from
    ``current`` (one-off seconds, ``objectives.layer_migration_s``)."""

    def option(plan: PlanResult) -> PlanOption:
        assert plan.predicted is not None
        terms = objective_terms(problem, plan.placement, weights, current)
        return PlanOption(
            segments=tuple(Segment(node=s.node, start=s.start, end=s.end) for s in plan.segments),  # type: ignore[arg-type]
            latency_s=plan.predicted.latency_s, bottleneck_s=plan.predicted.bottleneck_s,
            migration_cost_s=terms.migration_s, weighted_cost_s=terms.weighted_cost,
        )  # fmt: skip

    if not result.feasible:
        return PlanProposed(request_id=request.request_id, feasible=False,
                            reason=(result.reason or "infeasible")[:REASON_CHARS],
                            objective=problem.objective, method=result.method, optimal=result.optimal,
                            solve_s=solve_s, profile_as_of_s=request.profile.as_of_s)  # fmt: skip
    return PlanProposed(
        request_id=request.request_id, feasible=True, objective=problem.objective,
        best=option(result), alternatives=tuple(option(other) for other in result.alternatives),
        method=result.method, optimal=result.optimal, solve_s=solve_s,
        profile_as_of_s=request.profile.as_of_s,
    )  # fmt: skip
