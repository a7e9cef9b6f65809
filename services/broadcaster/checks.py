"""What the broadcaster refuses before it signs anything (issue #17, item 3). Pure.

The broadcaster is the only signer of plans, so it must not be a signing oracle: a
rollout is signed only when the request carries the orchestrator's signature (checked
by the service's `ControlGate`), when its plan keeps the private blocks of the policy in
force on nodes the operator's registry trusts enough (`private_problem`), and the
retained ledger it numbers epochs from is believed only when its ``highest_epoch`` is
within `MAX_EPOCH_GAP` of the committed epoch (`ledger_problem`): a "ledger bomb" (a
ledger near the largest epoch) would otherwise leave no epoch number to roll out with.
"""

from __future__ import annotations

from shared.messages import EpochLedger, Plan, PrivacyPolicy
from shared.security.trust import TrustRegistry

MAX_EPOCH_GAP = 1 << 20
"""Epochs a ledger may be ahead of the committed plan: each aborted rollout burns one, so
a million aborts in a row without a commit is not a real history."""


def ledger_problem(ledger: EpochLedger, committed_epoch: int) -> str | None:
    """Why ``ledger`` is not believed (None: it is)."""
    highest = max(ledger.highest_epoch, ledger.in_progress or 0)
    if highest > committed_epoch + MAX_EPOCH_GAP:
        return (f"ledger highest epoch {highest} is more than {MAX_EPOCH_GAP} ahead of the "
                f"committed epoch {committed_epoch}")  # fmt: skip
    return None


def private_problem(plan: Plan, num_layers: int | None, policy: PrivacyPolicy | None,
                    trust: TrustRegistry | None) -> str | None:  # fmt: skip
    """Why ``plan`` breaks ``policy`` for the registry's trust levels (None: it does not,
    or there is no policy or no registry to judge with: the workers' guards still do)."""
    if policy is None or trust is None or policy.trusted_level == 0:
        return None
    level = policy.trusted_level
    if trust.trust_of(plan.entry_node) < level:
        return (f"private: entry {plan.entry_node} has trust {trust.trust_of(plan.entry_node)}, "
                f"the embedding and head need {level}")  # fmt: skip
    layers = num_layers if num_layers is not None else plan.segments[-1].end
    for segment in plan.segments:
        if policy.protects_any(segment.start, segment.end, layers) and trust.trust_of(segment.node) < level:
            return (f"private: {segment.node} (trust {trust.trust_of(segment.node)}) would run blocks "
                    f"[{segment.start}, {segment.end}); {policy.private_text()} need {level}")  # fmt: skip
    return None
