"""What a worker refuses to run: the privacy policy in force on this node.

A node whose trust is below the policy's level may be neither the entry (the embedding
and the head see raw tokens) nor host any block the policy protects (the first
``private_blocks``; the last ``private_last_blocks`` when a published policy sets them).
The policy (a `PrivacyPolicy`) published at run time (retained on ``policy/privacy``)
can only tighten the node's configured one (``stricter``), never relax it, so a forged
policy cannot move private blocks onto it.
"""

from __future__ import annotations

import logging

from services.worker.settings import WorkerSettings
from shared.bus import Bus
from shared.errors import EdgesplitError
from shared.messages import PrivacyPolicy, PrivacyPolicySet
from shared.planning.route import Route
from shared.security.signing import ControlGate
from shared.topics import POLICY

log = logging.getLogger(__name__)


class PlanRefused(EdgesplitError):
    """A plan this worker will not take (signature, epoch, privacy, coverage)."""


class PrivacyGuard:
    """The privacy policy in force on one node and the check every plan passes."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.node = settings.node_id
        self.trust = settings.trust
        self.configured = PrivacyPolicy(trusted_level=settings.trusted_level,
                                        private_blocks=settings.private_blocks)  # fmt: skip
        self._published: PrivacyPolicy | None = None
        self._published_at_s = 0.0
        self.gate: ControlGate | None = None
        """Checks the signature of each published policy (None: accept every one)."""

    def in_force(self) -> PrivacyPolicy:
        """The stricter of the configured and the published policy."""
        if self._published is None:
            return self.configured
        return self.configured.stricter(self._published)

    def check(self, route: Route, segment: tuple[int, int] | None) -> None:
        """Raise PlanRefused when ``route`` makes this node the entry, or gives it
        ``segment`` holding a private block, while its trust is too low."""
        policy = self.in_force()
        if self.trust >= policy.trusted_level:
            return
        if route.entry == self.node:
            raise PlanRefused(
                f"node {self.node} (trust {self.trust}) cannot be the entry: the embedding and "
                f"head need trust >= {policy.trusted_level}"
            )
        if segment is not None and policy.protects_any(*segment, route.num_layers):
            raise PlanRefused(
                f"node {self.node} (trust {self.trust}) cannot run blocks {segment}: "
                f"{policy.private_text()} need trust >= {policy.trusted_level}"
            )

    def refusal(self, route: Route, segment: tuple[int, int] | None) -> str | None:
        """Why this node must not run ``segment`` of ``route`` under the policy in force
        now (None: it may). The data plane asks on every activation, so a policy that
        tightens while a plan runs stops private blocks here at once, before the
        orchestrator's re-plan moves them."""
        try:
            self.check(route, segment)
        except PlanRefused as error:
            return str(error)
        return None

    def published(self, message: PrivacyPolicySet) -> None:
        self._published = message.policy
        log.info("%s: privacy policy in force: %s", self.node, self.in_force().describe())

    async def follow(self, bus: Bus) -> None:
        """Track the retained policy until cancelled."""
        async with bus.subscribe(POLICY) as policies:
            async for _, message in policies:
                if self.accepts(message):
                    self.published(message)

    def accepts(self, message: PrivacyPolicySet) -> bool:
        """Signed, and not older than the policy in force (a replay of an old one)."""
        if self.gate is None:
            return True
        if not self.gate.signed(message):
            return False
        if message.set_at_s < self._published_at_s:
            self.gate.refuse(message, "replayed", f"set at {message.set_at_s} < {self._published_at_s}")
            return False
        self._published_at_s = message.set_at_s
        return True
