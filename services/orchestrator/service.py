"""The orchestrator service: the monitor-analyse-plan-execute loop over MQTT.

Monitor: it follows the monitor's retained `CapacityProfile`, its events, the retained
plan and privacy policy, and finished requests (for the token rate and the realised
effect). Analyse: every event, a policy change, a profile on which the running plan's
predicted time per token got worse by the threshold, and a jittered period raise a
trigger. Plan: it asks the split reviser for candidates over its planning view of the
profile and adds the migrations that keep the cut points (`candidates.py`, on a
thread). Execute: the pure `logic.decide` picks keep / migrate / re-split; a change is
sent to the broadcaster as a `RolloutRequested` and its `RolloutFinished` awaited.
Every decision is published as a `DecisionRecorded` (docs/ORCHESTRATOR.md).

On start it rebuilds its state from retained topics (plan, policy, the last decisions);
epochs belong to the broadcaster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from services.orchestrator import records
from services.orchestrator.calibration import OverheadCalibration, realised_effect
from services.orchestrator.candidates import evaluate_all, failover_entry, pinned_first
from services.orchestrator.exchanges import Exchanges, read_retained
from services.orchestrator.improvement import improvement
from services.orchestrator.logic import (
    CandidatePlan,
    Decision,
    OrchestratorState,
    Trigger,
    after_commit,
    allowed,
    decide,
)  # fmt: skip
from services.orchestrator.readiness import first_plan_wait, nodes_missing
from services.orchestrator.settings import OrchestratorSettings
from shared.bus import Bus, Subscription
from shared.errors import EdgesplitError
from shared.ids import NodeId, RequestId
from shared.messages import (
    CapacityProfile,
    DecisionRecorded,
    LinkPrecision,
    Plan,
    PlanOption,
    PlanProposed,
    PlanRequested,
    PrivacyPolicy,
    PrivacyPolicySet,
    RequestFinished,
    RolloutFinished,
    RolloutRequested,
    Segment,
)  # fmt: skip
from shared.metrics import Reading, ServiceMetrics, message_readings
from shared.model.manifest import ShardManifest
from shared.model.shard_files import ShardFiles
from shared.planning.precision import PrecisionPolicy
from shared.planning.view import CostModel, expected_load, planning_view
from shared.security.reporting import report_refusals
from shared.security.role_keys import role_verifier
from shared.security.signing import ControlGate, control_key, receiver_fences
from shared.security.trust import TrustRegistry, load_trust
from shared.topics import (
    CAPACITY,
    DECISION_SLOTS,
    DECISIONS,
    FINISHED,
    PLAN,
    POLICY,
    PROFILE_EVENTS,
    REVISER_REPLIES,
    ROLLOUT_RESULTS,
)  # fmt: skip

log = logging.getLogger(__name__)
KEPT_DECISIONS = 64
"""Decision records kept in memory (the last 16 stay retained on the broker)."""
MONITOR_KINDS = {"node_down", "node_joined", "node_overloaded", "node_overload_cleared",
                 "link_degraded", "link_recovered"}  # fmt: skip
"""Triggers from monitor events: decided on a profile at least as new as the event."""
FOLLOW_UP = "follow_up"
"""The trigger of the one re-evaluation after a change trigger that decided keep."""
IMPROVED = "profile_improved"
"""A link or node much better than the last evaluation saw (`improvement.py`): routine
like the period (a keep without a held-back alternative leaves no record)."""
__all__ = ["OrchestratorService", "OrchestratorSettings"]


class OrchestratorService:
    """Constructor does no I/O; ``run()`` serves until cancelled. ``clock``: Unix seconds.

    ``ready`` is set once its subscriptions are confirmed and retained state is read;
    ``decisions`` holds every record published (newest last)."""

    def __init__(self, settings: OrchestratorSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings, self.clock = settings, clock
        self.config = settings.decision_config()
        self.state = OrchestratorState()
        self.policy = PrivacyPolicy(private_blocks=settings.private_blocks,
                                    trusted_level=settings.trusted_level)  # fmt: skip
        """The policy in force: the settings' until a retained `PrivacyPolicySet` arrives."""
        self.entry = settings.entry
        self.profile: CapacityProfile | None = None
        self.manifest: ShardManifest | None = None
        self.manifest_sha256 = ""
        """sha256 of the shard store's manifest.json: every plan pins it."""
        self.ready = asyncio.Event()
        self.decisions: list[DecisionRecorded] = []
        self.counters: Counter[str] = Counter()
        self.gate = receiver_fences(ControlGate(control_key(settings) or "", "orchestrator", self.counters,
                                                   role_verifier(settings), settings.max_message_age_s),
                                       settings)  # fmt: skip
        """Signatures of the plans, policies, events and decisions it acts on."""
        self.trust: TrustRegistry | None = None
        """Each node's trust from the operator's registry (None: as the profile says)."""
        self.tracker = records.TpotTracker()
        self._origin = settings.client_id or f"orchestrator-{secrets.token_hex(4)}"
        self.metrics = ServiceMetrics("orchestrator", ("replans",))
        self._triggers: asyncio.Queue[Trigger] = asyncio.Queue(maxsize=256)
        self._profile_seen = asyncio.Event()
        self._profile_for_watch = asyncio.Event()
        self.exchanges = Exchanges()
        self._reference_latency_s: float | None = None
        self._missed_epoch: int | None = None
        """The epoch a prediction_missed trigger was raised for (once per epoch)."""
        self._reference: CandidatePlan | None = None
        self._decided_on: CapacityProfile | None = None
        """The profile the last evaluation saw (what ``profile_improved`` compares with)."""
        self._running_precisions: tuple[tuple[int, str], ...] = ()  # the running plan's link_precisions
        """The running plan as last evaluated: the model the overhead is measured against."""
        self.calibration = OverheadCalibration()
        self._initial_queued = False
        self._nodes_ready_at_s: float | None = None
        """When every expected node was first seen alive and measured (Unix s)."""
        self._waiting_for: str | None = None
        self._follow_up_armed = False
        self._random = random.Random(self._origin)

    async def run(self) -> None:
        """Serve until cancelled. Raises CheckpointError (bad shard store), BrokerUnavailable."""
        store = await asyncio.to_thread(ShardFiles, self.settings.shards_dir)
        self.trust = await asyncio.to_thread(load_trust, self.settings.identities_file)
        self.manifest, self.manifest_sha256 = store.manifest, store.manifest_sha256
        async with (self.metrics.served(self.settings), Bus(self.settings, origin=self._origin) as bus,
                    contextlib.AsyncExitStack() as stack):  # fmt: skip
            self.metrics.add_reader(lambda: [*message_readings(bus.counters, self.gate.refusals()),
                                             Reading("edgesplit_plan_epoch", float(self.state.epoch or 0))])
            subs: dict[Any, Subscription[Any]] = {topic: await stack.enter_async_context(bus.subscribe(topic, **params))  # type: ignore[arg-type]
                    for topic, params in ((PLAN, {}), (POLICY, {}), (DECISIONS, {}), (CAPACITY, {}),
                                          (PROFILE_EVENTS, {}), (ROLLOUT_RESULTS, {}), (FINISHED, {}),
                                          (REVISER_REPLIES, {"client": self._origin}))}  # fmt: skip
            await self._restore(subs[PLAN], subs[POLICY], subs[DECISIONS])
            # Decisions are read once, at start: left open, the subscription queued every
            # record this service published (measured in a 600 s soak: +16 MiB, linear,
            # until its 1000-message bound).
            subs[DECISIONS].close()
            self.ready.set()
            log.info("orchestrator ready: model %s, entry %s, running %s", self.manifest.model_name,
                     self.entry, self.state.segments or "nothing")  # fmt: skip
            async with asyncio.TaskGroup() as tasks:
                follow: dict[Any, Callable[[Any], None]] = {PLAN: self._on_plan, POLICY: self._on_policy, CAPACITY: self._on_profile,
                          PROFILE_EVENTS: self._on_event, ROLLOUT_RESULTS: self.exchanges.on_result,
                          FINISHED: self._on_reply, REVISER_REPLIES: self.exchanges.on_proposal}  # fmt: skip
                for topic, handler in follow.items():
                    tasks.create_task(self._follow(subs[topic], handler), name=f"follow-{topic.pattern}")
                tasks.create_task(self._periodic(), name="periodic")
                tasks.create_task(self._watch(), name="watch")
                tasks.create_task(self._control(bus, tasks), name="control")
                tasks.create_task(report_refusals(bus, self.settings.client_id or "orchestrator",
                                                  self.gate.refusals), name="refusals")  # fmt: skip

    # --- state from retained topics ---------------------------------------------------------

    async def _restore(self, plans: Subscription[Plan], policies: Subscription[PrivacyPolicySet],
                       decisions: Subscription[DecisionRecorded]) -> None:  # fmt: skip
        """Retained plan, policy and decisions: where the last orchestrator left off."""
        plan, policy, seen = await read_retained(plans, policies, decisions, self.settings.retained_wait_s)
        plan = plan if plan is not None and self.gate.signed(plan) else None
        policy = policy if policy is not None and self.gate.signed(policy) else None
        seen = sorted(seen, key=lambda r: r.decision_id, reverse=True)  # the newest sets the window
        seen = [record for record in seen if self.gate.signed(record) and self.gate.current(record, retained=True)]
        if plan is not None:
            self._on_plan(plan)
        self.policy = policy.policy if policy is not None else self.policy
        if seen:
            self.state = records.restored(self.state, seen)
            self.decisions = sorted(seen, key=lambda r: r.decision_id)
        else:  # no records: never reuse an id an earlier orchestrator may have issued
            self.state = replace(self.state, next_decision_id=records.first_decision_id(self.clock()))
        log.info("first decision id %d (%d retained records)", self.state.next_decision_id, len(seen))

    # --- followers --------------------------------------------------------------------------

    async def _follow(self, subscription: Subscription[Any], handler: Callable[[Any], None]) -> None:
        async for _, message in subscription:
            if not (self.gate.signed(message) and self.gate.current(message)):
                continue  # a forged plan, policy or NodeDown, or a replayed NodeDown, never steers it
            try:
                handler(message)
            except Exception:  # one bad message never stops the orchestrator
                self.counters["dropped"] += 1
                log.exception("dropped %s", type(message).__name__)

    def _on_plan(self, plan: Plan) -> None:
        if self.state.epoch is not None and plan.epoch <= self.state.epoch:
            return
        self.entry = self.entry or plan.entry_node
        if plan.segments != self.state.segments:
            self._reference_latency_s, self._reference = None, None
        self.state = replace(self.state, segments=plan.segments, epoch=plan.epoch)
        self._running_precisions = tuple((e.target, e.activations) for e in plan.link_precisions)

    def _on_policy(self, message: PrivacyPolicySet) -> None:
        old, policy = self.policy, message.policy
        self.policy = policy
        if old != policy:
            detail = f"private_blocks {old.private_blocks} -> {policy.private_blocks}, trusted_level {old.trusted_level} -> {policy.trusted_level}"
            if old.private_last_blocks != policy.private_last_blocks:
                detail += f", private_last_blocks {old.private_last_blocks} -> {policy.private_last_blocks}"
            self._enqueue(Trigger("policy_changed", self.clock(), True, detail))

    def _on_event(self, event: Any) -> None:
        trigger = records.trigger_of(event, self.clock())
        if trigger is not None:
            self._enqueue(trigger)

    def _on_profile(self, profile: CapacityProfile) -> None:
        self.profile = profile = self.trust.apply(profile) if self.trust is not None else profile
        in_flight = next((n.requests_in_flight for n in profile.nodes if n.node == self.entry), None)
        if in_flight is not None:
            self.calibration.load_seen(profile.as_of_s, in_flight)
        self._calibrate(self.clock())
        self._profile_seen.set()
        self._profile_for_watch.set()
        if not self.state.segments and not self._initial_queued and self._initial_ready(profile):
            self._initial_queued = True
            self._enqueue(Trigger("initial", profile.as_of_s, False, "every expected node is measured"))

    def _on_reply(self, reply: Any) -> None:
        if isinstance(reply, RequestFinished):
            now_s = self.clock()
            self.tracker.add(reply, now_s)
            self._check_prediction(reply, now_s)
            if self._reference is not None:
                self.calibration.finished(reply, now_s, self.state.changed_at_s, self._reference)
            self.state = replace(self.state, tokens_per_s=self.tracker.tokens_per_s(now_s))
            self._calibrate(now_s)

    def _check_prediction(self, reply: RequestFinished, now_s: float) -> None:
        """A request far slower than the running plan's prediction re-decides at once, past
        the dwell (once per epoch: the next decision re-arms it by committing)."""
        if self._reference_latency_s is None or self._missed_epoch == self.state.epoch:
            return
        if self.calibration.samples == 0:  # the overhead the prediction leaves out is not known yet
            return
        predicted_s = self._reference_latency_s + self.state.overhead_s
        trigger = records.prediction_missed(reply, now_s, self.state.changed_at_s, predicted_s)
        if trigger is not None:
            self._missed_epoch = self.state.epoch
            self._enqueue(trigger)

    def _calibrate(self, now_s: float) -> None:
        overhead = self.calibration.update(self.state.overhead_s, now_s, self.tracker)
        self.state = replace(self.state, overhead_s=overhead)

    def _initial_ready(self, profile: CapacityProfile) -> bool:
        """The first plan waits for a settled profile (`readiness.py`)."""
        expected = (*self.settings.expect_nodes, *((self.entry,) if self.entry else ()))
        now_s = self.clock()
        if self._nodes_ready_at_s is None and not nodes_missing(profile, expected):
            self._nodes_ready_at_s = now_s
        waiting = first_plan_wait(profile, expected, self._nodes_ready_at_s, now_s, self.settings.initial_wait_s)
        if waiting is not None and waiting != self._waiting_for:
            log.info("first plan: %s", waiting)
        self._waiting_for = waiting
        return self.entry is not None and waiting is None

    def _enqueue(self, trigger: Trigger) -> None:
        try:
            self._triggers.put_nowait(trigger)
        except asyncio.QueueFull:
            self.counters["triggers_dropped"] += 1

    async def _periodic(self) -> None:
        while True:
            low, high = 1 - self.settings.jitter, 1 + self.settings.jitter
            await asyncio.sleep(self.settings.period_s * self._random.uniform(low, high))
            if self.state.segments:
                self._enqueue(Trigger("periodic", self.clock()))
            elif self.profile is not None and self._initial_ready(self.profile):
                self._enqueue(Trigger("initial", self.clock(), False, "periodic retry"))

    async def _follow_up(self, trigger: Trigger) -> None:
        """A change trigger decided keep: evaluate once more ``follow_up_s`` later. The
        monitor's estimates converge over a few samples, so the first profile that shows a
        change may show only part of it (a link at 90 kB/s on its way to 50)."""
        await asyncio.sleep(self.settings.follow_up_s)
        self._follow_up_armed = False
        self._enqueue(Trigger(FOLLOW_UP, self.clock(), False, f"after {trigger.kind}"[:1024]))

    async def _watch(self) -> None:
        """On every profile: re-evaluate the running plan (on a thread); a prediction worse
        than at the last decision by the threshold, or a violated constraint, is a trigger."""
        while True:
            await self._profile_for_watch.wait()
            self._profile_for_watch.clear()
            profile, running, reference = self.profile, self.state.segments, self._reference_latency_s
            if profile is None or not running or reference is None or self.manifest is None:
                continue
            view = planning_view(profile, self.manifest, running)
            evaluated = await asyncio.to_thread(self._candidates, view, running, (), False)
            current = next((c for c in evaluated if c.kind == "current"), None)
            if current is None or running != self.state.segments:
                continue
            self.calibration.reference_seen(profile.as_of_s, current)
            trigger = records.watch_trigger(current, reference, self.config.relative_threshold, profile.as_of_s)
            if trigger is not None:
                self._enqueue(trigger)
                self._reference_latency_s = None if trigger.emergency else current.latency_s
                self._reference = None if trigger.emergency else self._reference
            elif self._decided_on is not None and (better := improvement(self._decided_on, profile)):
                self._decided_on = profile  # once per improvement, until the evaluation sees it
                self._enqueue(Trigger(IMPROVED, profile.as_of_s, False, better[:1024]))

    # --- the loop ---------------------------------------------------------------------------

    async def _control(self, bus: Bus, tasks: asyncio.TaskGroup) -> None:
        """One trigger (with those that queued meanwhile) at a time."""
        while True:
            batch = [await self._triggers.get()]
            while not self._triggers.empty():
                batch.append(self._triggers.get_nowait())
            trigger = records.merge(batch)
            try:
                await self._evaluate(bus, tasks, trigger)
            except EdgesplitError as error:
                self.counters["evaluation_failed"] += 1
                log.warning("evaluation of %s failed: %s", trigger.kind, error)
            finally:
                self._initial_queued = False

    async def _fresh_profile(self, at_s: float) -> CapacityProfile | None:
        """The profile, once it is as new as ``at_s`` (or the newest after profile_wait_s)."""
        try:
            async with asyncio.timeout(self.settings.profile_wait_s):
                while self.profile is None or self.profile.as_of_s < at_s:
                    self._profile_seen.clear()
                    await self._profile_seen.wait()
        except TimeoutError:
            pass
        return self.profile

    async def _evaluate(self, bus: Bus, tasks: asyncio.TaskGroup, trigger: Trigger) -> None:
        from_monitor = any(kind in MONITOR_KINDS for kind in trigger.kind.split("+"))
        profile = await self._fresh_profile(trigger.at_s if from_monitor else 0.0)
        if profile is None or self.entry is None or self.manifest is None:
            log.info("trigger %s: no profile or entry yet", trigger.kind)
            return
        self._fail_over_entry(profile)
        if not self.state.segments and not self._initial_ready(profile):
            return  # the first plan waits until every expected node is measured
        running = self.state.segments
        self._decided_on = profile
        view = planning_view(profile, self.manifest, running)
        load = expected_load(view, self.entry)  # what _candidates prices too (CostModel.at_load)
        proposal = await self._ask_reviser(bus, view, running, load)
        options = () if proposal is None or proposal.best is None else (proposal.best, *proposal.alternatives)
        pinned = self.settings.first_plan if not running else ()
        if pinned:
            options = (*options, PlanOption(segments=pinned, latency_s=0.0, bottleneck_s=0.0,
                                            migration_cost_s=0.0, weighted_cost_s=0.0))  # fmt: skip
        candidates = await asyncio.to_thread(self._candidates, view, running, options)
        candidates = allowed(self.settings.policy, running, candidates)
        if pinned:
            candidates = pinned_first(candidates, pinned)
        now_s = self.clock()
        decision = decide(self.state, trigger, candidates, now_s, self.config)
        current = decision.current
        feasible = current is not None and current.feasible
        self._reference_latency_s = current.latency_s if current is not None and feasible else None
        self._reference = current if feasible else None
        routine = all(kind in ("periodic", FOLLOW_UP, IMPROVED) for kind in trigger.kind.split("+"))
        if decision.action == "keep" and not routine and not trigger.emergency and not self._follow_up_armed:
            self._follow_up_armed = True
            tasks.create_task(self._follow_up(trigger), name="follow-up")
        if routine and decision.action == "keep" and not records.held_back(decision):
            return  # nothing worth a record: the plan is best or no alternative is close
        await self._record_and_execute(bus, tasks, trigger, decision, now_s, load)

    def _fail_over_entry(self, profile: CapacityProfile) -> None:
        """When the entry is down, the fastest alive node trusted enough to hold the
        embedding and head becomes the entry (clients resubmit to it; see services/cli/client.py)."""
        entry = failover_entry(profile, self.entry, self.policy.trusted_level)
        if entry is None:
            log.warning("entry %s is down and no alive node has trust >= %d", self.entry, self.policy.trusted_level)
        elif entry != self.entry:
            log.warning("entry %s is down: %s becomes the entry", self.entry, entry)
            self.entry = entry

    def _candidates(self, view: CapacityProfile, running: tuple[Segment, ...],
                    options: tuple[PlanOption, ...], moves: bool = True) -> tuple[CandidatePlan, ...]:  # fmt: skip
        """Runs on a thread. A source missing or down gives no candidates (keep)."""
        assert self.manifest is not None and self.entry is not None
        cost = CostModel.at_load(view, self.entry, self.settings.shard_load_bytes_per_s,
                                 self.settings.rebuild_context_tokens)  # fmt: skip
        return evaluate_all(view, self.manifest, self.policy, self.entry, running, options, cost, moves,
                            self._precision_policy(), self._running_precisions)  # fmt: skip

    def _precision_policy(self) -> PrecisionPolicy | None:
        """The activation precision policy the plans are searched and priced with (None: exact)."""
        precision = self.settings.precision_policy
        return precision if precision != PrecisionPolicy.exact() else None

    async def _ask_reviser(self, bus: Bus, view: CapacityProfile, running: tuple[Segment, ...],
                           load: float = 1.0) -> PlanProposed | None:  # fmt: skip
        assert self.manifest is not None and self.entry is not None
        request = PlanRequested(
            request_id=RequestId(f"o{secrets.token_hex(6)}"), reply_to=self._origin,
            model_id=self.manifest.model_name[:1024], source=NodeId(self.entry), profile=view,
            privacy=self.policy, current_segments=running, alternatives=self.settings.alternatives,
            precision=self._precision_policy(), expected_batch=min(load, 65_536.0),
        )  # fmt: skip
        proposal = await self.exchanges.plan(bus, request, self.settings.reviser_timeout_s)
        if proposal is None:
            self.counters["reviser_unanswered"] += 1
        return proposal

    async def _record_and_execute(self, bus: Bus, tasks: asyncio.TaskGroup, trigger: Trigger,
                                  decision: Decision, now_s: float, load: float | None = None) -> None:  # fmt: skip
        decision_id = self.state.next_decision_id
        self.state = replace(self.state, next_decision_id=decision_id + 1)
        running_nodes = tuple(dict.fromkeys(s.node for s in self.state.segments))
        record = records.record_of(decision_id, trigger, decision, now_s, self.state.epoch, running_nodes,
                                   self.state.overhead_s, load)
        baseline, _ = self.tracker.before(now_s, 3 * self.settings.observe_s)
        record = record.model_copy(update={"baseline_tpot_s": baseline})
        log.info("decision %d on %s: %s (overhead %.1f ms from %d requests, %d skipped)", decision_id,
                 trigger.kind, decision.reason, self.state.overhead_s * 1e3, self.calibration.samples,
                 self.calibration.skipped)  # fmt: skip
        await self._publish(bus, record)
        if not decision.changes_plan or decision.chosen is None:
            return
        self.metrics.replans.labels(trigger.kind, record.action).inc()
        result = await self._rollout(bus, decision_id, decision.chosen, decision.reason)
        if result is None:
            await self._publish(bus, record.model_copy(update={"outcome": "failed",
                                "outcome_detail": "no RolloutFinished before the deadline"}))  # fmt: skip
            return
        update = {"outcome": result.outcome, "outcome_detail": result.reason[:1024], "to_epoch": result.epoch}
        record = record.model_copy(update=update)
        await self._publish(bus, record)
        if result.outcome == "committed":
            committed_s = self.clock()
            self.state = after_commit(self.state, decision.chosen.segments, result.epoch, committed_s,
                                      initial=decision.current is None)  # fmt: skip
            self._running_precisions = decision.chosen.link_precisions
            self._reference_latency_s, self._reference = decision.chosen.latency_s, decision.chosen
            tasks.create_task(self._realise(bus, record, committed_s), name=f"realise-{decision_id}")

    async def _rollout(self, bus: Bus, decision_id: int, chosen: CandidatePlan,
                       reason: str) -> RolloutFinished | None:  # fmt: skip
        assert self.manifest is not None and self.entry is not None
        precisions = tuple(LinkPrecision(target=target, activations=precision)  # type: ignore[arg-type]
                           for target, precision in chosen.link_precisions)  # fmt: skip
        plan = Plan(epoch=(self.state.epoch or 0) + 1, model_id=self.manifest.model_name[:1024],
                    entry_node=self.entry, segments=chosen.segments,  # type: ignore[arg-type]
                    manifest_sha256=self.manifest_sha256, link_precisions=precisions)
        request = RolloutRequested(decision_id=decision_id, plan=plan, reason=reason[:1024],
                                   ready_timeout_s=min(600.0, self.settings.ready_timeout_s))  # fmt: skip
        return await self.exchanges.rollout(bus, request, self.settings.rollout_timeout_s)

    async def _realise(self, bus: Bus, record: DecisionRecorded, committed_s: float) -> None:
        """After the observation window, the measured TPOT of requests served by the new plan."""
        update = await realised_effect(self.tracker, record, committed_s, self.settings.observe_s, self.clock)
        if update is not None:
            await self._publish(bus, record.model_copy(update=update))

    async def _publish(self, bus: Bus, record: DecisionRecorded) -> None:
        """Publish ``record`` with the next revision of its decision (receivers refuse a
        revision not above the one they saw: docs/SECURITY.md). A record of a decision
        DECISION_SLOTS or more below the newest is kept here only: its slot holds a newer
        decision, and receivers would refuse it."""
        previous = next((d.revision for d in self.decisions if d.decision_id == record.decision_id), 0)
        record = record.model_copy(update={"revision": max(previous, record.revision) + 1})
        kept = [d for d in self.decisions if d.decision_id != record.decision_id] + [record]
        self.decisions = kept[-KEPT_DECISIONS:]  # bounded: a long run must not grow memory
        if record.decision_id < self.state.next_decision_id - DECISION_SLOTS:
            log.info("decision %d: record not republished (its slot holds a newer decision)", record.decision_id)
            return
        try:
            await bus.publish(DECISIONS, record, slot=str(record.decision_id % DECISION_SLOTS))
        except EdgesplitError as error:
            log.warning("decision %d not published: %s", record.decision_id, error)
