"""A control service's refusal counters, retained on ``services/{service}/status``.

The broadcaster, the orchestrator and the monitor publish a `ServiceStatus` whenever
their refusals (shared/security/signing.py, ``{Kind}_{why}``) changed, at most every
``period_s``; `edgesplit status` shows it beside the workers' ``NodeStatus.refused``.
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


async def report_refusals(bus: Bus, service: str, refusals: Callable[[], dict[str, int]],
                          period_s: float = 2.0) -> None:  # fmt: skip
    """Publish ``refusals()`` when it changed (checked every ``period_s``) until cancelled."""
    reported: dict[str, int] | None = None
    while True:
        now = refusals()
        if now != reported:
            try:
                await bus.publish(SERVICE_STATUS, ServiceStatus(service=service, at_s=time.time(), refused=now),
                                  service=service)  # fmt: skip
                reported = now
            except EdgesplitError as error:
                log.warning("%s: refusals not published: %s", service, error)
        await asyncio.sleep(period_s)
