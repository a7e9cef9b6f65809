"""The orchestrator's request / reply exchanges over MQTT: a `PlanRequested` answered by
the split reviser's `PlanProposed`, and a `RolloutRequested` answered by the
broadcaster's `RolloutFinished`. Replies are matched to waiting futures by request id or
decision id; every wait has a deadline, and a missing answer is None, never an error."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shared.bus import Bus, Subscription
from shared.errors import EdgesplitError
from shared.messages import (
    DecisionRecorded,
    Plan,
    PlanProposed,
    PlanRequested,
    PrivacyPolicySet,
    RolloutFinished,
    RolloutRequested,
)
from shared.topics import REVISER_REQUESTS, ROLLOUTS

log = logging.getLogger(__name__)


class Exchanges:
    """Futures of the requests in flight. ``on_proposal`` / ``on_result`` are the
    followers' handlers for the two reply topics."""

    def __init__(self) -> None:
        self._replies: dict[str, asyncio.Future[PlanProposed]] = {}
        self._results: dict[int, asyncio.Future[RolloutFinished]] = {}

    def on_proposal(self, proposal: PlanProposed) -> None:
        _settle(self._replies.get(proposal.request_id), proposal)

    def on_result(self, result: RolloutFinished) -> None:
        _settle(self._results.get(result.decision_id), result)

    async def plan(self, bus: Bus, request: PlanRequested, timeout_s: float) -> PlanProposed | None:
        """The split reviser's answer, or None (no answer within ``timeout_s``, broker away)."""
        future: asyncio.Future[PlanProposed] = asyncio.get_running_loop().create_future()
        self._replies[request.request_id] = future
        try:
            await bus.publish(REVISER_REQUESTS, request)
            async with asyncio.timeout(timeout_s):
                proposal = await future
        except (TimeoutError, EdgesplitError) as error:
            log.warning("split reviser did not answer (%s); deciding on migrations only", error or "timeout")
            return None
        finally:
            self._replies.pop(request.request_id, None)
        if not proposal.feasible:
            log.info("split reviser: no plan (%s): %s", proposal.error, proposal.reason)
        return proposal

    async def rollout(self, bus: Bus, request: RolloutRequested, timeout_s: float) -> RolloutFinished | None:
        """The broadcaster's outcome of the rollout, or None when none came in time."""
        future: asyncio.Future[RolloutFinished] = asyncio.get_running_loop().create_future()
        self._results[request.decision_id] = future
        try:
            await bus.publish(ROLLOUTS, request)
            async with asyncio.timeout(timeout_s):
                return await future
        except (TimeoutError, EdgesplitError) as error:
            log.warning("rollout of decision %d: %s", request.decision_id, error or "no result in time")
            return None
        finally:
            self._results.pop(request.decision_id, None)


def _settle(future: asyncio.Future[Any] | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


async def latest(subscription: Subscription[Any], deadline: float, *, drain: bool = True) -> Any | None:
    """The newest message already queued or arriving before ``deadline`` (loop time);
    ``drain=False``: the next one only (retained topics with several messages)."""
    loop = asyncio.get_running_loop()
    found = None
    while True:
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                _, found = await subscription.get()
        except TimeoutError:
            return found
        if not drain:
            return found


async def read_retained(plans: Subscription[Plan], policies: Subscription[PrivacyPolicySet],
                        decisions: Subscription[DecisionRecorded],
                        wait_s: float) -> tuple[Plan | None, PrivacyPolicySet | None, list[DecisionRecorded]]:  # fmt: skip
    """The retained plan, policy and decisions (all that arrive within ``wait_s``)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    plan = await latest(plans, deadline)
    policy = await latest(policies, deadline)
    seen: list[DecisionRecorded] = []
    while (record := await latest(decisions, deadline, drain=False)) is not None:
        seen.append(record)
    return plan, policy, seen
