"""Trust from identity: each node's trust level comes from the operator's registry.

A node's own `NodeStatus` says what trust it has; on the open profile that is all there
is. With a registry (``identities_file``: the state folder's identities.toml, written by
`edgesplit creds`; `up --secure` passes it) the monitor, the orchestrator and the
broadcaster take each node's trust from the registry's worker identity of that name
instead: what a node claims about itself is ignored for placement. A node absent from
the registry gets trust 0 (logged once per node). On the secure profile the ACL lets a
worker publish only under its own ``nodes/{node}/...`` topics, so a node id is the
authenticated identity that publishes for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shared.messages import CapacityProfile
from shared.security.acl import Role
from shared.security.creds import read_registry

log = logging.getLogger(__name__)


class TrustRegistry:
    """Worker identity -> trust level, from an identities.toml."""

    def __init__(self, trust: dict[str, int], source: str = "registry") -> None:
        self.trust = dict(trust)
        self.source = source
        self._unknown_logged: set[str] = set()

    @classmethod
    def from_file(cls, path: Path) -> TrustRegistry:
        """ConfigError naming the file when it cannot be read or parsed."""
        registry = read_registry(path)
        return cls({i.name: i.trust for i in registry.of_role(Role.WORKER)}, str(path))

    def trust_of(self, node: str) -> int:
        """The registry's trust of ``node``; 0 (logged once) when it is not registered."""
        known = self.trust.get(node)
        if known is not None:
            return known
        if node not in self._unknown_logged:
            self._unknown_logged.add(node)
            log.warning("node %s is not a worker of %s: trust 0 for placement", node, self.source)
        return 0

    def apply(self, profile: CapacityProfile) -> CapacityProfile:
        """``profile`` with every node's trust replaced by the registry's."""
        nodes = tuple(n.model_copy(update={"trust": self.trust_of(n.node)}) for n in profile.nodes)
        if nodes == profile.nodes:
            return profile
        return profile.model_copy(update={"nodes": nodes})


def load_trust(path: Path | None) -> TrustRegistry | None:
    """The registry at ``path``, or None without one (the open profile: trust as claimed)."""
    return TrustRegistry.from_file(path) if path is not None else None
