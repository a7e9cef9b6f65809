"""Model privacy policy: which blocks need which trust, applied to a problem.

The embedding and the output head always run on the source (the entry node), and the
first ``first_blocks`` transformer blocks see near-raw input: they all need
``min_trust``. Optionally the last ``last_blocks`` blocks too (their output is the
model's answer). ``apply_policy`` turns the policy into the problem's hard rules
(``layers[i].min_trust`` and ``source_min_trust``), so every solver honours it: a plan
that places such a block on a less trusted node is never produced, and if no trusted
node can hold them the answer is infeasible with that reason.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.planning.problem import Problem


class PrivacyPolicy(BaseModel):
    """Trust required by the blocks that see raw input or produce the output."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    min_trust: int = Field(ge=0, strict=True)
    first_blocks: int = Field(default=0, ge=0, strict=True)
    last_blocks: int = Field(default=0, ge=0, strict=True)


def block_min_trust(policy: PrivacyPolicy, num_layers: int) -> list[int]:
    """Per block, the trust the policy requires (0 where it requires none)."""
    protected = set(range(min(policy.first_blocks, num_layers)))
    protected |= set(range(max(0, num_layers - policy.last_blocks), num_layers))
    return [policy.min_trust if index in protected else 0 for index in range(num_layers)]


def apply_policy(problem: Problem, policy: PrivacyPolicy) -> Problem:
    """A copy of ``problem`` whose hard trust rules include the policy's.

    Existing rules are kept (the stricter of the two applies); the source must meet
    ``min_trust`` for the embedding and head.
    """
    required = block_min_trust(policy, len(problem.layers))
    layers = tuple(
        layer.model_copy(update={"min_trust": max(layer.min_trust, need)})
        for layer, need in zip(problem.layers, required, strict=True)
    )
    source_trust = max(problem.source_min_trust, policy.min_trust)
    return problem.model_copy(update={"layers": layers, "source_min_trust": source_trust})
