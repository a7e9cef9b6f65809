"""The ``profile_improved`` trigger (pure): a link or node got much better than in the
profile the last decision saw.

The running plan's own watch (`records.watch_trigger`) only sees a plan get worse; an
alternative that got better (a road-side unit fading in while the one in use fades out,
a node that sped up) leaves the running plan's prediction where it was, so before this
trigger only the periodic re-evaluation (5 s +- 20 %) found it. The factors are large on
purpose: measurement noise (+-10 % on a shaped link, CPU jitter on a fast one) must not
re-decide, and a re-decision that finds nothing better is a keep without a record.
"""

from __future__ import annotations

from shared.messages import CapacityProfile

BANDWIDTH_FACTOR = 2.0
"""A link's bandwidth at least this many times its value at the last decision."""
FAST_LINK_BYTES_PER_S = 20e6
"""Links already at least this fast do not count (their probes measure CPU jitter)."""
RTT_FACTOR = 0.5
RTT_MIN_DROP_S = 0.01
"""A link's round trip at most RTT_FACTOR x its value at the last decision and
RTT_MIN_DROP_S shorter."""
SPEED_FACTOR = 1.5
"""A node's measured speed (flops_per_s) at least this many times its value then."""


def improvement(reference: CapacityProfile, now: CapacityProfile) -> str | None:
    """What got much better in ``now`` than in ``reference`` (the profile the last
    decision saw), as a one-line detail; None when nothing did."""
    before = {(link.src, link.dst): link for link in reference.links}
    for link in now.links:
        old = before.get((link.src, link.dst))
        if old is None:
            continue
        slow = old.bandwidth_bytes_per_s < FAST_LINK_BYTES_PER_S
        if slow and link.bandwidth_bytes_per_s >= BANDWIDTH_FACTOR * old.bandwidth_bytes_per_s > 0:
            return (f"link {link.src}->{link.dst} {link.bandwidth_bytes_per_s / 1e3:.0f} kB/s, "
                    f"was {old.bandwidth_bytes_per_s / 1e3:.0f}")  # fmt: skip
        if link.rtt_s is not None and old.rtt_s is not None:
            if link.rtt_s <= RTT_FACTOR * old.rtt_s and link.rtt_s <= old.rtt_s - RTT_MIN_DROP_S:
                return f"link {link.src}->{link.dst} rtt {link.rtt_s * 1e3:.1f} ms, was {old.rtt_s * 1e3:.1f}"
    nodes = {node.node: node for node in reference.nodes}
    for node in now.nodes:
        old_node = nodes.get(node.node)
        if old_node is None or not node.alive or not old_node.alive or old_node.flops_per_s <= 0:
            continue
        if node.flops_per_s >= SPEED_FACTOR * old_node.flops_per_s:
            return f"node {node.node} {node.flops_per_s / old_node.flops_per_s:.1f} x faster"
    return None
