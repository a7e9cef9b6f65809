"""A control service's refusal counters, retained on ``services/{service}/status``.

The broadcaster, the orchestrator, the monitor and the split reviser publish a
`ServiceStatus` whenever their refusals (shared/security/signing.py, ``{Kind}_{why}``)
changed, at most every ``period_s``, and at least every ``HEARTBEAT_S`` (its ``at_s`` is
what `edgesplit health`, a container's health check, reads as liveness); `edgesplit
status` shows it beside the workers' ``NodeStatus.refused``.
In the secure profile the ACL lets each publish only its own instance (its identity).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from shared.bus import Bus
from shared.errors import EdgesplitError
from shared.messages import ServiceStatus
from shared.topics import SERVICE_STATUS

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
"""A status is republished at least this often, seconds, even when nothing changed."""


async def report_refusals(bus: Bus, service: str, refusals: Callable[[], dict[str, int]],
                          period_s: float = 2.0, heartbeat_s: float = HEARTBEAT_S) -> None:  # fmt: skip
    """Publish ``refusals()`` when it changed (checked every ``period_s``), and at least
    every ``heartbeat_s``, until cancelled."""
    reported: dict[str, int] | None = None
    reported_at_s = 0.0
    while True:
        now = {**refusals(), **bus.refusals()}  # sessions taken over count beside the refusals
        if now != reported or time.monotonic() - reported_at_s >= heartbeat_s:
            try:
                await bus.publish(SERVICE_STATUS, ServiceStatus(service=service, at_s=time.time(), refused=now),
                                  service=service)  # fmt: skip
                reported, reported_at_s = now, time.monotonic()
            except EdgesplitError as error:
                log.warning("%s: refusals not published: %s", service, error)
        await asyncio.sleep(period_s)
