"""After a run: re-plans with their cause, reaction, stall and bytes moved; mismatches
against the unsplit reference; privacy violations. Pure functions over what was recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.cli.scenarios.events import PolicyChange
from services.cli.scenarios.observe import SeenDecision
from services.cli.scenarios.records import Replan, RequestRecord
from shared.messages import Plan
from shared.topology import Topology

CAUSE_WINDOW_S = 30.0
"""A re-plan is attributed to the latest change at most this long before its decision."""
IN_FLIGHT_ALLOWANCE_S = 0.2
"""Tokens arriving this soon after a policy change were computed before workers had it."""
EMBED_TOLERANCE = 1e-4
"""Largest absolute difference of an embedding component from the unsplit reference."""


def replans(decisions: dict[int, SeenDecision], changes: Sequence[tuple[float, str]],
            plans: Sequence[tuple[float, Plan]], requests: Sequence[RequestRecord],
            block_bytes: Sequence[int], t0_unix_s: float) -> list[Replan]:  # fmt: skip
    """Committed plan changes, in commit order."""
    out: list[Replan] = []
    by_epoch = {plan.epoch: plan for _, plan in plans}
    for seen in sorted(decisions.values(), key=lambda s: s.committed_at_s or 0.0):
        record = seen.record
        if seen.committed_at_s is None or record.to_epoch is None:
            continue
        decided_s = record.at_s - t0_unix_s
        cause = _cause(changes, decided_s)
        new = by_epoch.get(record.to_epoch)
        old = by_epoch.get(record.from_epoch or -1)
        out.append(Replan(
            at_s=round(seen.committed_at_s, 3),
            kind="migrate" if record.action == "migrate" else "resplit",
            trigger=record.trigger,
            reaction_s=None if cause is None else round(seen.committed_at_s - cause[0], 3),
            stall_ms=round(stall_ms(requests, seen.committed_at_s), 1),
            bytes_moved=moved_bytes(old, new, block_bytes),
            epoch=record.to_epoch,
            layout=_layout(new),
            predicted_tpot_s=record.predicted_latency_s,
            realised_tpot_s=record.realised_tpot_s,
            cause=None if cause is None else cause[1],
        ))  # fmt: skip
    return out


def _cause(changes: Sequence[tuple[float, str]], decided_s: float) -> tuple[float, str] | None:
    before = [c for c in changes if c[0] <= decided_s + 0.05 and decided_s - c[0] <= CAUSE_WINDOW_S]
    return max(before, key=lambda c: c[0]) if before else None


def _layout(plan: Plan | None) -> str:
    if plan is None:
        return ""
    layout = " ".join(f"{s.node}[{s.start},{s.end})" for s in plan.segments)
    if plan.link_precisions:  # lossy hops, by the block their frames enter
        layout += " (" + ", ".join(f"{e.activations} into {e.target}" for e in plan.link_precisions) + ")"
    return layout


def moved_bytes(old: Plan | None, new: Plan | None, block_bytes: Sequence[int]) -> int:
    """Shard bytes of the blocks a node holds in ``new`` but did not hold in ``old``."""
    if new is None:
        return 0
    held = {(str(s.node), b) for s in (old.segments if old else ()) for b in range(s.start, s.end)}
    return sum(block_bytes[b] for s in new.segments for b in range(s.start, s.end)
               if (str(s.node), b) not in held and b < len(block_bytes))  # fmt: skip


def stall_ms(requests: Sequence[RequestRecord], at_s: float) -> float:
    """The longest gap between two consecutive tokens of one request across ``at_s``."""
    longest = 0.0
    for request in requests:
        times = request.token_times_s
        for before, after in zip(times, times[1:], strict=False):
            if before < at_s <= after:
                longest = max(longest, (after - before) * 1e3)
    return longest


def mismatched(kind: str, got: Sequence[float] | Sequence[int], want: Sequence[float] | Sequence[int] | None) -> bool:
    """A completed answer that differs from the unsplit reference (generate: any token;
    embed: a component by more than EMBED_TOLERANCE). No reference: not a mismatch."""
    if want is None:
        return False
    if kind == "generate":
        return tuple(got) != tuple(want)
    return len(got) != len(want) or any(abs(a - b) > EMBED_TOLERANCE for a, b in zip(got, want, strict=True))


def agreement(kind: str, got: Sequence[float] | Sequence[int],
              want: Sequence[float] | Sequence[int] | None) -> float | None:
    """How close a completed answer is to the unsplit fp32 reference (the quality a lossy
    precision costs): generate, the share of the reference's tokens matched before the
    first difference (greedy decoding diverges after it); embed, the cosine similarity.
    None without a reference."""
    if want is None:
        return None
    if kind == "generate":
        same = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        return same / len(want) if want else 1.0
    dot = math.fsum(float(a) * float(b) for a, b in zip(got, want, strict=False))
    norms = math.sqrt(math.fsum(float(a) ** 2 for a in got)) * math.sqrt(math.fsum(float(b) ** 2 for b in want))
    return dot / norms if norms > 0 and len(got) == len(want) else 0.0


def privacy_violations(plans: Sequence[tuple[float, Plan]], policies: Sequence[PolicyChange],
                       topology: Topology, num_layers: int, requests: Sequence[RequestRecord],
                       end_s: float) -> int:  # fmt: skip
    """(plan, block) pairs where a private block (or the entry's embedding and head, as
    block -1) ran on a node below the trusted level of the policy in force: counted when a
    token or answer arrived while that plan and that policy were both in force."""
    trust = {node.id: node.trust for node in topology.nodes}
    arrivals = sorted(t for r in requests for t in (r.token_times_s or ((r.finished_at_s,) if r.finished_at_s else ())))
    found: set[tuple[int, int]] = set()
    for index, (plan_start, plan) in enumerate(plans):
        plan_end = plans[index + 1][0] if index + 1 < len(plans) else end_s
        for p_index, change in enumerate(policies):
            policy_end = policies[p_index + 1].at_s if p_index + 1 < len(policies) else end_s
            grace = IN_FLIGHT_ALLOWANCE_S if p_index > 0 else 0.0
            start, stop = max(plan_start, change.at_s + grace), min(plan_end, policy_end)
            if start >= stop or not any(start <= t < stop for t in arrivals):
                continue
            level = change.policy.trusted_level
            if trust.get(str(plan.entry_node), 0) < level:
                found.add((plan.epoch, -1))
            for segment in plan.segments:
                if trust.get(str(segment.node), 0) >= level:
                    continue
                for block in range(segment.start, segment.end):
                    if change.policy.is_private(block, num_layers):
                        found.add((plan.epoch, block))
    return len(found)
