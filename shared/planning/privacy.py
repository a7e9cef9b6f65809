"""The privacy policy as the planner's hard rules.

The policy itself is `shared.messages.PrivacyPolicy` (the one type the policy message,
the split reviser's request and the worker's guard use too): the embedding and the
output head always run on the source (the entry node), and the first
``private_blocks`` transformer blocks see near-raw input: they all need
``trusted_level``. Optionally the last ``private_last_blocks`` blocks too (their output
is the model's answer). ``apply_policy`` turns the policy into the problem's hard rules
(``layers[i].min_trust`` and ``source_min_trust``), so every solver honours it: a plan
that places such a block on a less trusted node is never produced, and if no trusted
node can hold them the answer is infeasible with that reason.
"""

from __future__ import annotations

from shared.messages import PrivacyPolicy
from shared.planning.problem import Problem


def block_min_trust(policy: PrivacyPolicy, num_layers: int) -> list[int]:
    """Per block, the trust the policy requires (0 where it requires none)."""
    return list(policy.block_trust(num_layers))


def apply_policy(problem: Problem, policy: PrivacyPolicy) -> Problem:
    """A copy of ``problem`` whose hard trust rules include the policy's.

    Existing rules are kept (the stricter of the two applies); the source must meet
    ``trusted_level`` for the embedding and head.
    """
    required = block_min_trust(policy, len(problem.layers))
    layers = tuple(
        layer.model_copy(update={"min_trust": max(layer.min_trust, need)})
        for layer, need in zip(problem.layers, required, strict=True)
    )
    source_trust = max(problem.source_min_trust, policy.trusted_level)
    return problem.model_copy(update={"layers": layers, "source_min_trust": source_trust})
