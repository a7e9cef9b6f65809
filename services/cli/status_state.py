"""What `edgesplit status` knows about a cluster: the retained state, folded into one snapshot.

`StatusSnapshot.apply` takes each message read from the status topics (node statuses,
the capacity profile, the plan, decisions, the privacy policy, emulation states) and
keeps the newest of each. `status` reads it once; `status --watch` keeps applying
messages and redraws from it (services/cli/status_view.py). No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.messages import (
    CapacityProfile,
    DecisionRecorded,
    EmulationApplied,
    NodeStatus,
    Plan,
    PrivacyPolicySet,
    ServiceStatus,
    Telemetry,
)

KEPT_DECISIONS = 64
"""Decisions kept by id; the orchestrator retains 16, a watch sees newer ones arrive."""


@dataclass
class StatusSnapshot:
    """The newest retained state of one cluster, as far as it has been read."""

    broker: str
    """The broker URL, password redacted."""
    cluster: str
    nodes: dict[str, NodeStatus] = field(default_factory=dict)
    capacity: CapacityProfile | None = None
    plan: Plan | None = None
    decisions: dict[int, DecisionRecorded] = field(default_factory=dict)
    """Newest version of each decision, by decision id."""
    policy: PrivacyPolicySet | None = None
    emulation: dict[str, EmulationApplied] = field(default_factory=dict)
    forged: dict[str, int] = field(default_factory=dict)
    """Frames each node dropped as forged (failed authentication) since it started, from
    its newest telemetry (nodes that reported none are absent)."""
    services: dict[str, ServiceStatus] = field(default_factory=dict)
    """Each control service's refusal counters, by service."""
    connected: bool = True
    """False while the bus is reconnecting (the view then says its data may be stale)."""
    version: int = 0
    """Incremented by every `apply` that changed something."""

    def apply(self, message: object) -> bool:
        """Fold one received message in; True when it changed the snapshot.

        A message of a kind this snapshot does not track is ignored (False).
        """
        changed = self._apply(message)
        if changed:
            self.version += 1
        return changed

    def _apply(self, message: object) -> bool:
        if isinstance(message, NodeStatus):
            return _put(self.nodes, message.node, message)
        if isinstance(message, EmulationApplied):
            return _put(self.emulation, message.node, message)
        if isinstance(message, ServiceStatus):
            return _put(self.services, message.service, message)
        if isinstance(message, DecisionRecorded):
            shown = self.decisions.get(message.decision_id)
            if shown is not None and message.revision < shown.revision:
                return False  # an older revision of a record shown (a replay): keep the newer
            changed = _put(self.decisions, message.decision_id, message)
            for stale in sorted(self.decisions)[:-KEPT_DECISIONS]:
                del self.decisions[stale]
            return changed
        if isinstance(message, Plan):
            changed = message != self.plan
            self.plan = message
            return changed
        if isinstance(message, CapacityProfile):
            changed = message != self.capacity
            self.capacity = message
            return changed
        if isinstance(message, PrivacyPolicySet):
            changed = message != self.policy
            self.policy = message
            return changed
        if isinstance(message, Telemetry):
            if message.frames_forged == self.forged.get(message.node, 0):
                return False
            self.forged[message.node] = message.frames_forged
            return True
        return False

    def refusals(self) -> dict[str, dict[str, int]]:
        """Refused control messages by node or service (shared/security/signing.py)."""
        found = {name: dict(status.refused) for name, status in self.nodes.items() if status.refused}
        found.update({name: dict(s.refused) for name, s in self.services.items() if s.refused})
        return dict(sorted(found.items()))

    def latest_decisions(self, count: int) -> list[DecisionRecorded]:
        """The newest version of each of the ``count`` newest decisions, oldest first."""
        return [self.decisions[key] for key in sorted(self.decisions)[-count:]] if count else []

    def node_names(self) -> list[str]:
        """Every node seen in a status, the profile or the plan, sorted."""
        names = set(self.nodes)
        if self.capacity is not None:
            names.update(node.node for node in self.capacity.nodes)
        if self.plan is not None:
            names.update(segment.node for segment in self.plan.segments)
        return sorted(names)

    def structure(self) -> tuple[Any, ...]:
        """What a reader would call a change, without the measured numbers.

        Node states, trust, epochs and segments; the plan; each link's health; each
        decision's outcome and realised effect; the policy; emulations. `status --watch`
        on a pipe prints a new frame when this changes, not whenever the monitor's
        numbers move (they do every telemetry window).
        """
        nodes = tuple(
            (n.node, n.state, n.trust, n.epoch, n.segments, n.entry)
            for n in sorted(self.nodes.values(), key=lambda n: n.node)
        )
        health: tuple[Any, ...] = ()
        if self.capacity is not None:
            health = tuple(sorted((n.node, n.health) for n in self.capacity.nodes)) + tuple(
                sorted((link.src, link.dst, link.health, link.degraded)
                       for link in self.capacity.links)
            )  # fmt: skip
        decisions = tuple(
            (d.decision_id, d.action, d.outcome, d.to_epoch, d.realised_tpot_s)
            for d in self.latest_decisions(len(self.decisions))
        )
        emulation = tuple(
            (e.node, e.slowdown, e.links) for e in sorted(self.emulation.values(), key=lambda e: e.node)
        )
        plan = self.plan.model_dump(exclude={"signature"}) if self.plan is not None else None
        policy = self.policy.policy if self.policy is not None else None
        forged = tuple(sorted(self.forged.items()))
        return (self.connected, nodes, health, plan, decisions, policy, emulation, forged, self.refusals())


def _put(table: dict[Any, Any], key: Any, message: object) -> bool:
    changed = table.get(key) != message
    table[key] = message
    return changed
