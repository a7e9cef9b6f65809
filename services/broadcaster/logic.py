"""The broadcaster's decisions, pure: ``apply(state, event) -> (state, actions)``.

Two-phase rollout of a plan as the next epoch (docs/ARCHITECTURE.md, "Reconfiguration
broadcast"). Events are `Requested` (a RolloutRequested arrived), `Acked` (an EpochReady
or EpochRejected), `Deadline` (the clock passed a READY deadline, or any timer tick),
`PlanSeen` (a retained plan, our own echo included), `LedgerSeen` (a retained
EpochLedger), `NodeLost` (a node's Last Will or the monitor's NodeDown: a rollout whose
plan needs that node is aborted at once, rather than waiting out its READY deadline
while the entry's requests time out; one that names a node still down is refused
before it starts) and `NodeBack` (its birth, or NodeJoined). Actions are `Publish(topic, message)`, executed in order by the service.
Times are monotonic seconds supplied by the caller, so the machine is deterministic.

Idempotence: acks are keyed by (epoch, node), so duplicated or reordered acks are
harmless; a RolloutRequested equal to the active, a queued or a recently finished
rollout (same decision id and plan) is ignored. An epoch number is used once: an
aborted epoch is burned, the next rollout takes ``highest_epoch + 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shared.errors import InvalidPlan
from shared.messages import (
    AbortEpoch,
    CommitEpoch,
    EpochLedger,
    EpochReady,
    EpochRejected,
    Message,
    Plan,
    PrepareEpoch,
    RolloutFinished,
    RolloutRequested,
)
from shared.messages.base import signing_bytes
from shared.planning.route import route_of
from shared.security.frame_keys import derive_frame_key
from shared.topics import EPOCH_COMMANDS, PLAN, ROLLOUT_LEDGER, ROLLOUT_RESULTS, Topic

REASON_LIMIT = 1024  # RolloutFinished.reason / AbortEpoch.reason are ShortText


@dataclass(frozen=True)
class BroadcastConfig:
    """What the machine needs besides events. ``num_layers`` None: taken from each plan."""

    signing_key: str
    num_layers: int | None = None
    manifest_sha256: str = ""
    """sha256 of the served shard store's manifest.json (empty: unknown). A plan pinning
    another is refused; a plan pinning none is rolled out pinned to this one."""
    max_queued: int = 16
    """Rollouts waiting behind the active one; more are refused."""
    remembered: int = 64
    """Finished rollouts remembered to recognise a duplicated RolloutRequested."""
    plan_signer: Callable[[Plan], Plan] | None = None
    """Signs each plan with the broadcaster's role key (shared/security/role_keys.py);
    None: the cluster HMAC key ``signing_key``."""


@dataclass(frozen=True)
class Rollout:
    """The rollout in flight: PREPARE sent, waiting for every node's ack."""

    decision_id: int
    epoch: int
    previous_epoch: int
    plan: Plan
    """The signed plan with ``epoch``."""
    nodes: frozenset[str]
    ready: frozenset[str]
    started_s: float
    deadline_s: float
    ready_timeout_s: float


@dataclass(frozen=True)
class BroadcastState:
    config: BroadcastConfig
    committed_epoch: int = 0
    """The epoch of the retained plan (0: none)."""
    highest_epoch: int = 0
    """The highest epoch number ever used; the next rollout takes one more."""
    active: Rollout | None = None
    queue: tuple[RolloutRequested, ...] = ()
    finished: tuple[tuple[int, bytes], ...] = ()
    """(decision id, plan key) of recently finished or refused rollouts, oldest first."""
    down: frozenset[str] = frozenset()
    """Nodes last seen down (Last Will, NodeDown) and not back since (online, NodeJoined)."""

    @property
    def next_deadline_s(self) -> float | None:
        """When a `Deadline` event must be fed next (None: nothing waits)."""
        return self.active.deadline_s if self.active is not None else None


# --- events and actions ------------------------------------------------------------------


@dataclass(frozen=True)
class Requested:
    request: RolloutRequested
    now_s: float
    refusal: str | None = None
    """Why the service refuses it before it is queued (services/broadcaster/checks.py)."""


@dataclass(frozen=True)
class Acked:
    ack: EpochReady | EpochRejected
    now_s: float


@dataclass(frozen=True)
class Deadline:
    now_s: float


@dataclass(frozen=True)
class PlanSeen:
    """A plan on the plan topic whose signature the service has checked."""

    plan: Plan
    now_s: float


@dataclass(frozen=True)
class LedgerSeen:
    ledger: EpochLedger


@dataclass(frozen=True)
class NodeLost:
    """A node went down: its status is offline (Last Will) or the monitor says NodeDown."""

    node: str
    how: str
    now_s: float


@dataclass(frozen=True)
class NodeBack:
    """A node is up again: its status is online (birth) or the monitor says NodeJoined."""

    node: str


Event = Requested | Acked | Deadline | PlanSeen | LedgerSeen | NodeLost | NodeBack


@dataclass(frozen=True)
class Publish:
    """Publish ``message`` on ``topic`` (QoS and retain come from the topic)."""

    topic: Topic[Any]
    message: Message
    params: dict[str, str] = field(default_factory=dict)


Actions = tuple[Publish, ...]


# --- the machine -------------------------------------------------------------------------


def apply(state: BroadcastState, event: Event) -> tuple[BroadcastState, Actions]:
    """The state after ``event`` and what to publish, in order. Never raises."""
    if isinstance(event, Requested):
        return _on_request(state, event.request, event.now_s, event.refusal)
    if isinstance(event, Acked):
        return _on_ack(state, event.ack, event.now_s)
    if isinstance(event, Deadline):
        active = state.active
        if active is None or event.now_s < active.deadline_s:
            return state, ()  # a tick, or a deadline already settled
        missing = ", ".join(sorted(active.nodes - active.ready))
        reason = f"no answer from {missing} within {active.ready_timeout_s:g} s"
        return _abort(state, reason, event.now_s)
    if isinstance(event, PlanSeen):
        return _on_plan(state, event.plan, event.now_s)
    if isinstance(event, NodeBack):
        return replace(state, down=state.down - {event.node}), ()
    if isinstance(event, NodeLost):
        state = replace(state, down=state.down | {event.node})
        active = state.active
        if active is None or event.node not in active.nodes:
            return state, ()
        return _abort(state, f"{event.node} went down ({event.how}) during the rollout of epoch {active.epoch}",
                      event.now_s)  # fmt: skip
    return replace(state, highest_epoch=max(state.highest_epoch, event.ledger.highest_epoch)), ()


def recover(
    config: BroadcastConfig, plan: Plan | None, ledger: EpochLedger | None
) -> tuple[BroadcastState, Actions]:
    """The state at start from the retained plan and ledger, and the actions that settle a
    rollout a previous instance left in progress: re-COMMIT it when the plan topic already
    holds it (the crash came after the commit record), else ABORT it."""
    committed = plan.epoch if plan is not None else 0
    highest = max(committed, ledger.highest_epoch if ledger is not None else 0,
                  (ledger.in_progress or 0) if ledger is not None else 0)  # fmt: skip
    state = BroadcastState(config, committed_epoch=committed, highest_epoch=highest)
    if ledger is None or ledger.in_progress is None:
        return state, ()
    epoch, decision_id = ledger.in_progress, ledger.decision_id or 0
    clear = Publish(ROLLOUT_LEDGER, EpochLedger(highest_epoch=highest))
    if epoch == committed:
        finished = RolloutFinished(decision_id=decision_id, epoch=epoch,
                                   previous_epoch=ledger.previous_epoch, outcome="committed",
                                   reason="committed; result re-sent after a broadcaster restart")  # fmt: skip
        return state, (Publish(EPOCH_COMMANDS, CommitEpoch(epoch=epoch)), clear,
                       Publish(ROLLOUT_RESULTS, finished))  # fmt: skip
    reason = f"broadcaster restarted during the rollout of epoch {epoch}"
    finished = RolloutFinished(decision_id=decision_id, epoch=epoch, previous_epoch=committed,
                               outcome="aborted", reason=reason)  # fmt: skip
    if epoch < committed:  # a newer plan superseded it; its nodes have moved on
        return state, (clear, Publish(ROLLOUT_RESULTS, finished))
    return state, (Publish(EPOCH_COMMANDS, AbortEpoch(epoch=epoch, reason=reason)), clear,
                   Publish(ROLLOUT_RESULTS, finished))  # fmt: skip


def shutdown(state: BroadcastState, now_s: float) -> tuple[BroadcastState, Actions]:
    """The broadcaster stops: abort the active rollout and refuse the queued ones, so no
    worker stays half-prepared and no requester waits for an answer that never comes."""
    actions: list[Publish] = []
    for request in state.queue:
        state, refused = _refuse(state, request.decision_id, (request.decision_id, plan_key(request.plan)),
                                 "the broadcaster stopped before this rollout started")  # fmt: skip
        actions.extend(refused)
    state = replace(state, queue=())
    if state.active is not None:
        reason = f"the broadcaster stopped during the rollout of epoch {state.active.epoch}"
        state, aborted = _abort(state, reason, now_s)  # the queue is empty: nothing starts
        actions[:0] = aborted
    return state, tuple(actions)


def validate(plan: Plan, num_layers: int | None) -> str | None:
    """Why ``plan`` cannot be rolled out (None: it can): segments must be contiguous
    half-open ranges covering [0, L) in order, each node once (L: ``num_layers``, or the
    plan's own last segment end)."""
    layers = num_layers if num_layers is not None else plan.segments[-1].end
    try:
        route_of(plan, layers)
    except InvalidPlan as error:
        return f"invalid plan: {str(error).split(': ', 1)[-1]}"
    return None


def plan_key(plan: Plan) -> bytes:
    """What identifies a plan's content for duplicate detection (epoch and signature aside)."""
    return signing_bytes(plan.model_copy(update={"epoch": 0, "signature": ""}))


def _on_request(
    state: BroadcastState, request: RolloutRequested, now_s: float, refusal: str | None = None
) -> tuple[BroadcastState, Actions]:
    key = (request.decision_id, plan_key(request.plan))
    if _is_duplicate(state, key):
        return state, ()
    problem = refusal or validate(request.plan, state.config.num_layers)
    pinned, served = request.plan.manifest_sha256, state.config.manifest_sha256
    if problem is None and pinned and served and pinned != served:
        problem = f"the plan pins shard manifest sha256 {pinned}; the served store's is {served}"
    if problem is None and len(state.queue) >= state.config.max_queued:
        problem = (
            f"{len(state.queue)} rollouts already wait (the bound is {state.config.max_queued})"
        )
    if problem is not None:
        return _refuse(state, request.decision_id, key, problem)
    state = replace(state, queue=(*state.queue, request))
    return _start_next(state, now_s)


def _is_duplicate(state: BroadcastState, key: tuple[int, bytes]) -> bool:
    waiting = [(r.decision_id, plan_key(r.plan)) for r in state.queue]
    if state.active is not None:
        waiting.append((state.active.decision_id, plan_key(state.active.plan)))
    return key in waiting or key in state.finished


def _refuse(
    state: BroadcastState, decision_id: int, key: tuple[int, bytes], reason: str
) -> tuple[BroadcastState, Actions]:
    """Answer a rollout that never starts: no epoch is used (epoch == previous_epoch)."""
    epoch = state.committed_epoch
    finished = RolloutFinished(decision_id=decision_id, epoch=epoch, previous_epoch=epoch,
                               outcome="aborted", reason=reason[:REASON_LIMIT])  # fmt: skip
    return _remember(state, key), (Publish(ROLLOUT_RESULTS, finished),)


def _remember(state: BroadcastState, key: tuple[int, bytes]) -> BroadcastState:
    finished = (*state.finished, key)[-state.config.remembered :]
    return replace(state, finished=finished)


def _start_next(state: BroadcastState, now_s: float) -> tuple[BroadcastState, Actions]:
    """PREPARE the first queued rollout when none is active."""
    refused: list[Publish] = []
    while state.active is None and state.queue:
        request = state.queue[0]
        lost = sorted({request.plan.entry_node, *(s.node for s in request.plan.segments)} & state.down)
        if not lost:
            break
        state, refusal = _refuse(replace(state, queue=state.queue[1:]), request.decision_id,
                                 (request.decision_id, plan_key(request.plan)),
                                 f"{', '.join(lost)} down before the rollout started")  # fmt: skip
        refused.extend(refusal)
    if state.active is not None or not state.queue:
        return state, tuple(refused)
    request, queue = state.queue[0], state.queue[1:]
    epoch = max(state.highest_epoch, state.committed_epoch) + 1
    pin = request.plan.manifest_sha256 or state.config.manifest_sha256
    plan = request.plan.model_copy(update={"epoch": epoch, "signature": "", "manifest_sha256": pin})
    signer = state.config.plan_signer
    plan = signer(plan) if signer is not None else plan.sign(state.config.signing_key)
    nodes = frozenset({plan.entry_node, *(segment.node for segment in plan.segments)})
    active = Rollout(decision_id=request.decision_id, epoch=epoch,
                     previous_epoch=state.committed_epoch, plan=plan, nodes=nodes,
                     ready=frozenset(), started_s=now_s,
                     deadline_s=now_s + request.ready_timeout_s,
                     ready_timeout_s=request.ready_timeout_s)  # fmt: skip
    ledger = EpochLedger(highest_epoch=epoch, in_progress=epoch, decision_id=request.decision_id,
                         previous_epoch=state.committed_epoch)  # fmt: skip
    frame_key = derive_frame_key(state.config.signing_key, epoch, plan.signature).hex()
    prepare = PrepareEpoch(epoch=epoch, plan=plan, ready_timeout_s=request.ready_timeout_s,
                           frame_key=frame_key)  # fmt: skip
    state = replace(state, active=active, queue=queue, highest_epoch=epoch)
    return state, (*refused, Publish(ROLLOUT_LEDGER, ledger), Publish(EPOCH_COMMANDS, prepare))


def _on_ack(
    state: BroadcastState, ack: EpochReady | EpochRejected, now_s: float
) -> tuple[BroadcastState, Actions]:
    active = state.active
    if active is None or ack.epoch != active.epoch or ack.node not in active.nodes:
        return state, ()  # another epoch's ack, a late duplicate, or a stranger
    if isinstance(ack, EpochRejected):
        return _abort(state, f"{ack.node} rejected epoch {ack.epoch}: {ack.reason}", now_s)
    active = replace(active, ready=active.ready | {ack.node})
    if active.ready != active.nodes:
        return replace(state, active=active), ()
    return _commit(replace(state, active=active), now_s)


def _commit(state: BroadcastState, now_s: float) -> tuple[BroadcastState, Actions]:
    active = state.active
    assert active is not None
    finished = RolloutFinished(decision_id=active.decision_id, epoch=active.epoch,
                               previous_epoch=active.previous_epoch, outcome="committed",
                               prepare_s=max(0.0, now_s - active.started_s))  # fmt: skip
    actions = (
        Publish(PLAN, active.plan),  # the committed record first: restarted workers read it
        Publish(EPOCH_COMMANDS, CommitEpoch(epoch=active.epoch)),
        Publish(ROLLOUT_LEDGER, EpochLedger(highest_epoch=state.highest_epoch)),
        Publish(ROLLOUT_RESULTS, finished),
    )
    return _finish(replace(state, committed_epoch=active.epoch), actions, now_s)


def _abort(
    state: BroadcastState, reason: str, now_s: float, *, command: bool = True
) -> tuple[BroadcastState, Actions]:
    """End the active rollout as aborted; ``command`` False skips AbortEpoch (superseded)."""
    active = state.active
    assert active is not None
    reason = reason[:REASON_LIMIT]
    finished = RolloutFinished(decision_id=active.decision_id, epoch=active.epoch,
                               previous_epoch=active.previous_epoch, outcome="aborted",
                               reason=reason, prepare_s=max(0.0, now_s - active.started_s))  # fmt: skip
    actions: list[Publish] = []
    if command:
        actions.append(Publish(EPOCH_COMMANDS, AbortEpoch(epoch=active.epoch, reason=reason)))
    actions.append(Publish(ROLLOUT_LEDGER, EpochLedger(highest_epoch=state.highest_epoch)))
    actions.append(Publish(ROLLOUT_RESULTS, finished))
    return _finish(state, tuple(actions), now_s)


def _finish(
    state: BroadcastState, actions: Sequence[Publish], now_s: float
) -> tuple[BroadcastState, Actions]:
    """Forget the active rollout, remember it as finished and start the next one."""
    active = state.active
    assert active is not None
    state = _remember(replace(state, active=None), (active.decision_id, plan_key(active.plan)))
    state, more = _start_next(state, now_s)
    return state, (*actions, *more)


def _on_plan(state: BroadcastState, plan: Plan, now_s: float) -> tuple[BroadcastState, Actions]:
    """Track the committed epoch. A plan at or past the active epoch that we did not
    commit (another publisher) supersedes the rollout: it ends as aborted."""
    if plan.epoch <= state.committed_epoch:
        return state, ()  # our own echo, a duplicate or an older plan
    state = replace(state, committed_epoch=plan.epoch,
                    highest_epoch=max(state.highest_epoch, plan.epoch))  # fmt: skip
    active = state.active
    if active is None or plan.epoch < active.epoch:
        return state, ()
    reason = f"superseded: plan epoch {plan.epoch} was published by another publisher"
    return _abort(state, reason, now_s, command=plan.epoch > active.epoch)
