"""The gateway's live dashboard: the cluster as the bus shows it, folded into one JSON
view and pushed to browsers with server-sent events.

`DashboardState.follow` reads the retained plan (``plan/current``), the monitor's
capacity profile (``monitor/capacity``) and the orchestrator's decisions
(``orchestrator/decisions/+``); the gateway adds the time per output token of the
requests it serves (`record_tpot`). `dashboard_view` is a pure function of that state.
``GET /dashboard`` is the page (static/dashboard.html: plain HTML, JS and SVG, no CDN,
no build step); ``GET /dashboard/state`` the view once; ``GET /dashboard/events`` the
view again after every change (at most every ``MIN_PUSH_S``, a comment line every
``KEEPALIVE_S`` when nothing changes).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from shared.bus import Bus
from shared.messages import CapacityProfile, DecisionRecorded, Plan
from shared.subscription import Subscription
from shared.topics import CAPACITY, DECISIONS, PLAN

KEPT_DECISIONS = 8
"""Decisions shown, newest first."""
KEPT_TPOT_POINTS = 600
"""Time-per-token points kept (one per output token after the first)."""
MIN_PUSH_S = 0.2
KEEPALIVE_S = 15.0


def dashboard_page() -> str:
    """The page's HTML (shipped in the package)."""
    return resources.files("services.gateway").joinpath("static/dashboard.html").read_text(encoding="utf-8")


class DashboardState:
    """The newest plan, profile and decisions, and the recent time per token. Loop-owned."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.profile: CapacityProfile | None = None
        self.decisions: dict[int, DecisionRecorded] = {}
        self.tpot: deque[tuple[float, float]] = deque(maxlen=KEPT_TPOT_POINTS)
        self.version = 0
        self._changed = asyncio.Event()

    def apply(self, message: object) -> None:
        """Fold one plan, profile or decision in (others are ignored)."""
        if isinstance(message, Plan):
            if self.plan is not None and message.epoch < self.plan.epoch:
                return
            self.plan = message
        elif isinstance(message, CapacityProfile):
            self.profile = message
        elif isinstance(message, DecisionRecorded):
            shown = self.decisions.get(message.decision_id)
            if shown is not None and message.revision < shown.revision:
                return  # an older revision of a record shown (a replay): keep the newer
            self.decisions[message.decision_id] = message
            for stale in sorted(self.decisions)[:-KEPT_DECISIONS]:
                del self.decisions[stale]
        else:
            return
        self._touch()

    def record_tpot(self, gap_s: float) -> None:
        """One time per output token (seconds) of a request the gateway served."""
        self.tpot.append((time.time(), gap_s))
        self._touch()

    def _touch(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout_s: float) -> bool:
        """Wait for the next change, at most ``timeout_s``; True when one came."""
        event = self._changed
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            return False
        return True

    async def follow(self, bus: Bus) -> None:
        """Apply every plan, profile and decision the bus delivers, until cancelled."""
        subscriptions: list[Subscription[Any]] = [bus.subscribe(PLAN), bus.subscribe(CAPACITY),
                                                  bus.subscribe(DECISIONS)]  # fmt: skip
        try:
            async with asyncio.TaskGroup() as group:
                for subscription in subscriptions:
                    group.create_task(self._follow(subscription), name=f"dashboard-{subscription.filter}")
        finally:
            for subscription in subscriptions:
                subscription.close()

    async def _follow(self, subscription: Subscription[Any]) -> None:
        async for delivery in subscription:
            self.apply(delivery.message)

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: the view now, then after each change; keep-alive comments."""
        sent = -1
        while True:
            if self.version != sent:
                sent = self.version
                yield f"data: {json.dumps(dashboard_view(self), separators=(',', ':'))}\n\n"
                await asyncio.sleep(MIN_PUSH_S)  # a burst of changes is one push
                continue
            if not await self.changed(KEEPALIVE_S):
                yield ": keep-alive\n\n"


def dashboard_view(state: DashboardState) -> dict[str, Any]:
    """What the page draws: nodes, links, the plan's segments, decisions, time per token."""
    plan, profile = state.plan, state.profile
    spans = [(str(s.node), s.start, s.end) for s in plan.segments] if plan else []
    segments = [{"node": node, "start": start, "end": end} for node, start, end in spans]
    held = {node: (start, end) for node, start, end in spans}
    nodes: dict[str, dict[str, Any]] = {}
    for capacity in profile.nodes if profile else ():
        nodes[capacity.node] = {
            "id": capacity.node, "health": capacity.health if capacity.alive else "down",
            "trust": capacity.trust, "utilisation": capacity.cpu_utilisation,
            "kv_cache_bytes": capacity.kv_cache_bytes, "requests_in_flight": capacity.requests_in_flight,
        }  # fmt: skip
    for name in held:
        nodes.setdefault(name, {"id": name, "health": "unknown", "trust": None, "utilisation": None,
                                "kv_cache_bytes": None, "requests_in_flight": None})  # fmt: skip
    for shown in nodes.values():
        blocks = held.get(shown["id"])
        shown["blocks"] = list(blocks) if blocks else None
    links = [{"src": link.src, "dst": link.dst, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
              "latency_s": link.latency_s, "health": link.health}
             for link in (profile.links if profile else ())]  # fmt: skip
    decisions = [_decision(state.decisions[key]) for key in sorted(state.decisions, reverse=True)]
    return {
        "version": state.version,
        "model": plan.model_id if plan else None,
        "epoch": plan.epoch if plan else None,
        "entry": plan.entry_node if plan else None,
        "num_blocks": max((end for _node, _start, end in spans), default=0),
        "segments": segments,
        "nodes": [nodes[key] for key in sorted(nodes)],
        "links": sorted(links, key=lambda link: (link["src"], link["dst"])),
        "decisions": decisions,
        "tpot_ms": [[round(at_s, 3), round(gap_s * 1e3, 3)] for at_s, gap_s in state.tpot],
    }


def _decision(decision: DecisionRecorded) -> dict[str, Any]:
    return {
        "id": decision.decision_id, "at_s": decision.at_s, "trigger": decision.trigger,
        "action": decision.action, "outcome": decision.outcome, "from_epoch": decision.from_epoch,
        "to_epoch": decision.to_epoch, "predicted_gain_s": decision.predicted_gain_s,
        "realised_gain_s": decision.realised_gain_s, "current_latency_s": decision.current_latency_s,
        "predicted_latency_s": decision.predicted_latency_s,
    }  # fmt: skip
