"""What a worker refuses to run: the privacy policy in force on this node.

A node whose trust is below the policy's level may be neither the entry (the embedding
and the head see raw tokens) nor host any of the first ``private_blocks`` blocks. The
policy published at run time (retained on ``policy/privacy``) can only tighten the
node's configured one, never relax it, so a forged policy cannot move private blocks
onto it.
"""

from __future__ import annotations

import logging

from services.worker.settings import WorkerSettings
from shared.bus import Bus
from shared.errors import EdgesplitError
from shared.messages import PrivacyPolicySet
from shared.planning.route import Route
from shared.topics import POLICY

log = logging.getLogger(__name__)


class PlanRefused(EdgesplitError):
    """A plan this worker will not take (signature, epoch, privacy, coverage)."""


class PrivacyGuard:
    """The privacy policy in force on one node and the check every plan passes."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.node = settings.node_id
        self.settings = settings
        self._published: PrivacyPolicySet | None = None

    def in_force(self) -> tuple[int, int]:
        """(trusted level, private blocks): the stricter of configured and published."""
        published = self._published
        if published is None:
            return self.settings.trusted_level, self.settings.private_blocks
        return (max(self.settings.trusted_level, published.trusted_level),
                max(self.settings.private_blocks, published.private_blocks))  # fmt: skip

    def check(self, route: Route, segment: tuple[int, int] | None) -> None:
        """Raise PlanRefused when ``route`` makes this node the entry, or gives it
        ``segment`` overlapping the private blocks, while its trust is too low."""
        level, private = self.in_force()
        trust = self.settings.trust
        if trust >= level:
            return
        if route.entry == self.node:
            raise PlanRefused(
                f"node {self.node} (trust {trust}) cannot be the entry: the embedding and "
                f"head need trust >= {level}"
            )
        if segment is not None and segment[0] < private:
            raise PlanRefused(
                f"node {self.node} (trust {trust}) cannot run blocks {segment}: blocks "
                f"[0, {private}) need trust >= {level}"
            )

    def published(self, policy: PrivacyPolicySet) -> None:
        self._published = policy
        log.info("%s: privacy policy in force: trust >= %d for blocks [0, %d)",
                 self.node, *self.in_force())  # fmt: skip

    async def follow(self, bus: Bus) -> None:
        """Track the retained policy until cancelled."""
        async with bus.subscribe(POLICY) as policies:
            async for _, policy in policies:
                self.published(policy)
