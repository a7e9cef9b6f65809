"""Candidate plans on the live profile (pure): the planning view, evaluation, migrations.

The orchestrator plans for decode time per output token, the number users feel. Its
*planning view* of the monitor's `CapacityProfile` differs from the raw profile in three
ways (docs/ORCHESTRATOR.md):

- speed: ``flops_per_s`` = mean block FLOP per token / measured ``decode_s_per_block``
  (the monitor's own number comes from prefill, which amortises per-step overheads); an
  encoder (BERT: one pass per request, never a decode step) uses the measured
  ``prefill_s_per_block_token`` instead, or a slowdown of its nodes would never show;
- utilisation: 0, because the measured block time already includes everything that
  slows the node (emulated slowdown, other work); the compute-thread busy share the
  monitor reports is mostly our own pipeline, and counting it again would push work
  off every node in use and back (flapping);
- memory: the blocks a node holds in the running plan count as free for it (a worker
  keeps the shards it holds).

The same view goes to the split reviser, so its latencies and ours are the same
formula (docs/PLANNER.md). Candidates are re-evaluated here with the independent
evaluator, and migration costs come from one model for all of them:

    migration_cost_s = sum over moved blocks of (weight_bytes / shard_load_bytes_per_s
                        + the cheaper of: flops x rebuild_tokens / speed of the new host,
                          kv_bytes_per_token x rebuild_tokens / bandwidth old -> new host)

where a block *moves* when its host changes and ``rebuild_tokens`` is the KV state
(tokens of the requests in flight) to rebuild on the new host: recomputed there, or
handed over from the old host (the workers' KV handoff, services/worker/handoff.py) when
the old host is still in the problem with a link to the new one.

A candidate's time per token is taken under the load now (``concurrency`` C = requests in
flight at the entry): max(the planner's latency of one request, the longest round of C
steps on one serial stage), a stage being a node's compute of its segment or a link's
bytes / bandwidth: C x one step, or t x (1 + s (C - 1)) on a node whose batch scaling s
is measured, which runs the C steps as one batched forward (`logic.per_token_s`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Iterable

from services.orchestrator.logic import CandidateKind, CandidatePlan, Stage, classify, per_token_s
from shared.errors import EdgesplitError
from shared.messages import CapacityProfile, PlanOption, PrivacyPolicy, Segment
from shared.model.manifest import ShardManifest
from shared.planning.precision import PrecisionPolicy
from shared.planning.precision_plan import assign_precisions
from shared.planning.problem import (
    Placement,
    Problem,
    boundary_bytes,
    effective_flops_per_s,
    evaluate,
)
from shared.planning.view import CostModel, planning_problem

log = logging.getLogger(__name__)

MAX_PERMUTATIONS = 5040
"""Node assignments tried for migrations (7! : every assignment of up to 7 segments)."""





def with_precisions(placement: Placement, precisions: tuple[tuple[int, str], ...],
                    num_layers: int) -> Placement:  # fmt: skip
    """``placement`` with the hop precisions of a plan's ``link_precisions``."""
    at = dict(precisions)
    segments = tuple(seg.model_copy(update={"activations": at.get(seg.start, "fp32")})
                     for seg in placement.segments)  # fmt: skip
    return Placement(segments=segments, return_activations=at.get(num_layers, "fp32"))  # type: ignore[arg-type]


def link_precisions(placement: Placement, num_layers: int) -> tuple[tuple[int, str], ...]:
    """The lossy hops of ``placement`` as (block the frames enter, precision), for the
    plan's ``link_precisions`` (fp32 hops are left out: exact is the default)."""
    hops = [(seg.start, seg.activations) for seg in placement.segments]
    hops.append((num_layers, placement.return_activations))
    return tuple((target, precision) for target, precision in hops if precision != "fp32")


def migration_cost_s(problem: Problem, running: tuple[Segment, ...],
                     segments: tuple[Segment, ...], cost: CostModel) -> float:  # fmt: skip
    """One-off seconds to go from ``running`` to ``segments`` (module docstring); inf when
    a moved block's new host is not in the problem or cannot compute."""
    holder = {layer: s.node for s in running for layer in range(s.start, s.end)}
    nodes, links = problem.node_index(), problem.link_index()
    terms: list[float] = []
    for segment in segments:
        node = nodes.get(segment.node)
        for layer_index in range(segment.start, min(segment.end, len(problem.layers))):
            if holder.get(layer_index) == segment.node:
                continue
            if node is None:
                return math.inf
            layer = problem.layers[layer_index]
            speed = effective_flops_per_s(node)
            rebuild = layer.flops * cost.rebuild_tokens / speed if speed > 0 else math.inf
            old = holder.get(layer_index)
            link = links.get((old, segment.node)) if old is not None and old in nodes else None
            if link is not None and link.bandwidth_bytes_per_s > 0:
                handoff = layer.kv_bytes_per_token * cost.rebuild_tokens / link.bandwidth_bytes_per_s
                rebuild = min(rebuild, handoff + link.latency_s)
            terms += [layer.weight_bytes / cost.shard_load_bytes_per_s, rebuild]
    return math.fsum(terms)


def serial_stage_s(problem: Problem, segments: tuple[Segment, ...],
                   precisions: tuple[tuple[int, str], ...] = ()) -> float:  # fmt: skip
    """The longest time one request's decode step holds a resource that serves one step at
    a time: a node's compute of its segment, or a link's bandwidth (bytes / bandwidth at
    the hop's activation precision, ``precisions`` as `link_precisions` gives them; the
    latency overlaps with other requests' frames). inf when a node or link is missing."""
    return max((seconds for seconds, _ in serial_stages(problem, segments, precisions)), default=0.0)


def serial_stages(problem: Problem, segments: tuple[Segment, ...],
                  precisions: tuple[tuple[int, str], ...] = ()) -> tuple[Stage, ...]:  # fmt: skip
    """Each stage of `serial_stage_s` as (seconds of one request's step, batch scaling):
    a node's measured ``batch_scaling`` (None: not measured), None for a link (a batch's
    frame carries every request's bytes)."""
    nodes, links, num_layers = problem.node_index(), problem.link_index(), len(problem.layers)
    at = dict(precisions)
    stages: list[Stage] = []
    previous = problem.source
    for segment, boundary in [(s, s.start) for s in segments] + [(None, num_layers)]:
        here = problem.source if segment is None else segment.node
        if here != previous:
            link = links.get((previous, here))
            sent = boundary_bytes(problem, boundary, at.get(boundary, "fp32"))
            stages.append((sent / link.bandwidth_bytes_per_s if link else math.inf, None))
        if segment is not None:
            node = nodes.get(here)
            speed = effective_flops_per_s(node) if node is not None else 0.0
            flops = math.fsum(layer.flops for layer in problem.layers[segment.start : min(segment.end, num_layers)])
            stages.append((flops / speed if speed > 0 else math.inf, node.batch_scaling if node else None))
        previous = here
    return tuple(stages)


def evaluate_candidate(problem: Problem, running: tuple[Segment, ...],
                       segments: tuple[Segment, ...], origin: str, cost: CostModel,
                       *, is_running: bool = False,
                       running_precisions: tuple[tuple[int, str], ...] = ()) -> CandidatePlan:  # fmt: skip
    """``segments`` evaluated on ``problem``: latency, bottleneck, violations, migration cost.

    The running plan's memory violations are ignored (it is loaded and serving), and its
    hops are priced at the precisions it runs with (``running_precisions``); another
    candidate's at those the problem's precision policy assigns."""
    placement = Placement.of(*((s.node, s.start, s.end) for s in segments))
    if is_running:
        placement = with_precisions(placement, running_precisions, len(problem.layers))
    elif problem.precision is not None:  # each hop's activation precision under the policy
        placement = assign_precisions(problem, placement)
    precisions = link_precisions(placement, len(problem.layers))
    evaluation = evaluate(problem, placement)
    violations = evaluation.violations
    if is_running:
        violations = tuple(v for v in violations if not v.startswith("memory:"))
    kind: CandidateKind = "current" if is_running else _kind(running, segments)
    stages = serial_stages(problem, segments, precisions)
    serial = max((seconds for seconds, _ in stages), default=0.0)
    return CandidatePlan(
        kind=kind, segments=segments, stages=stages,
        latency_s=per_token_s(evaluation.latency_s, serial, cost.concurrency, stages),
        bottleneck_s=evaluation.bottleneck_s,
        migration_cost_s=0.0 if is_running else migration_cost_s(problem, running, segments, cost),
        violations=violations, origin=origin,  # type: ignore[arg-type]
        unloaded_s=evaluation.latency_s, serial_s=serial, link_precisions=precisions,
    )  # fmt: skip


def _kind(running: tuple[Segment, ...], segments: tuple[Segment, ...]) -> CandidateKind:
    action = classify(running, segments)
    return "migrate" if action == "migrate" else "resplit"


def migrations(problem: Problem, running: tuple[Segment, ...]) -> list[tuple[Segment, ...]]:
    """Every other assignment of the running plan's ranges to distinct nodes of the
    problem (the cut points stay), in a deterministic order, at most MAX_PERMUTATIONS."""
    if not running:
        return []
    node_ids = sorted(node.id for node in problem.nodes)
    plans: list[tuple[Segment, ...]] = []
    for nodes in itertools.islice(itertools.permutations(node_ids, len(running)), MAX_PERMUTATIONS):
        segments = tuple(Segment(node=n, start=s.start, end=s.end)  # type: ignore[arg-type]
                         for n, s in zip(nodes, running, strict=True))  # fmt: skip
        if segments != running:
            plans.append(segments)
    return plans


def build_candidates(problem: Problem, running: tuple[Segment, ...],
                     options: Iterable[PlanOption], cost: CostModel,
                     keep_migrations: int = 4,
                     running_precisions: tuple[tuple[int, str], ...] = ()) -> tuple[CandidatePlan, ...]:  # fmt: skip
    """The running plan (if any, at its ``running_precisions``), the reviser's options and
    the best ``keep_migrations`` feasible migrations, each evaluated on ``problem``;
    duplicates dropped."""
    found: dict[tuple[Segment, ...], CandidatePlan] = {}
    if running:
        found[running] = evaluate_candidate(problem, running, running, "running", cost, is_running=True,
                                            running_precisions=running_precisions)  # fmt: skip
    for option in options:
        segments = tuple(option.segments)
        if segments not in found:
            found[segments] = evaluate_candidate(problem, running, segments, "reviser", cost)
    plans = migrations(problem, running) if keep_migrations > 0 else []
    moved = [evaluate_candidate(problem, running, s, "migration", cost) for s in plans]
    moved = sorted((c for c in moved if c.feasible and c.segments not in found),
                   key=lambda c: (c.latency_s, c.migration_cost_s, str(c.segments)))  # fmt: skip
    for candidate in moved[:keep_migrations]:
        found[candidate.segments] = candidate
    return tuple(found.values()) + recompressed(problem, running, cost, running_precisions)


def recompressed(problem: Problem, running: tuple[Segment, ...], cost: CostModel,
                 running_precisions: tuple[tuple[int, str], ...]) -> tuple[CandidatePlan, ...]:
    """The running plan with the hop precisions the policy gives it now, when they differ
    from those it runs with (a link slowed or recovered), and, when it runs lossy hops,
    the running plan all exact: changes that move no block, decided like a migration
    (``logic.classify``; going back to exact needs no time saving, ``logic.score``).
    None without a precision policy."""
    if not running or problem.precision is None:
        return ()
    found: dict[tuple[tuple[int, str], ...], CandidatePlan] = {}
    candidate = evaluate_candidate(problem, running, running, "migration", cost)
    found[candidate.link_precisions] = dataclasses.replace(candidate, kind="migrate")
    if running_precisions:
        exact = evaluate_candidate(problem, running, running, "migration", cost, is_running=True)
        found.setdefault((), dataclasses.replace(exact, kind="migrate", origin="migration"))
    found.pop(running_precisions, None)
    return tuple(found.values())


def evaluate_all(view: CapacityProfile, manifest: ShardManifest, policy: PrivacyPolicy, source: str,
                 running: tuple[Segment, ...], options: Iterable[PlanOption], cost: CostModel,
                 moves: bool = True, precision: PrecisionPolicy | None = None,
                 running_precisions: tuple[tuple[int, str], ...] = ()) -> tuple[CandidatePlan, ...]:  # fmt: skip
    """Every candidate on the planning ``view`` (`build_candidates`); ``moves=False``: the
    running plan and ``options`` only; ``precision``: each new candidate's hops compressed
    as that policy allows (the running plan's: ``running_precisions``, what it runs with).
    A source missing or down gives none (keep)."""
    try:
        problem = planning_problem(view, manifest, policy, source, cost, precision)
    except EdgesplitError as error:
        log.warning("no planning problem: %s", error)
        return ()
    return build_candidates(problem, running, options, cost, keep_migrations=4 if moves else 0,
                            running_precisions=running_precisions)  # fmt: skip


def failover_entry(profile: CapacityProfile, entry: str | None, trusted_level: int) -> str | None:
    """The entry to use on ``profile``: ``entry`` while it is alive or not yet in the profile
    (a node still starting is not down); else the fastest alive node with trust >=
    ``trusted_level`` (ties by id); None when there is none."""
    alive = [n for n in profile.nodes if n.alive]
    if any(n.node == entry for n in alive) or all(n.node != entry for n in profile.nodes):
        return entry  # alive, or not seen yet (starting): a node never seen is not down
    trusted = sorted((n for n in alive if n.trust >= trusted_level), key=lambda n: (-n.flops_per_s, n.node))
    return trusted[0].node if trusted else None


def pinned_first(candidates: tuple[CandidatePlan, ...], pinned: tuple[Segment, ...]) -> tuple[CandidatePlan, ...]:
    """The first plan's candidates when one was pinned (`--first-plan`): that plan alone
    if it is feasible on the measured profile, else every candidate (planned as usual,
    with a warning naming why: a pinned node that is down or too small must not block
    the first plan)."""
    chosen = tuple(c for c in candidates if c.segments == pinned and c.feasible)
    if chosen:
        return chosen
    found = next((c for c in candidates if c.segments == pinned), None)
    why = "not evaluated" if found is None else "; ".join(found.violations) or "not feasible"
    log.warning("first plan %s is not feasible on the measured profile (%s): planning as usual",
                " ".join(f"{s.node}[{s.start},{s.end})" for s in pinned), why)  # fmt: skip
    return candidates
