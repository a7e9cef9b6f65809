"""The privacy policy: one type for the policy message, the planner and the worker's guard.

A policy says which blocks see near-raw input or produce the answer, and the trust a
node needs to run them: the embedding and the head (always on the entry node), the
first ``private_blocks`` transformer blocks and, optionally, the last
``private_last_blocks`` need trust >= ``trusted_level``. The same value is published on
``policy/privacy`` (`PrivacyPolicySet`), sent to the split reviser (`PlanRequested`),
turned into the planner's hard rules (``shared.planning.privacy.apply_policy``) and
enforced by every worker (``services.worker.guard``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from shared.messages.base import Message, NonNegativeFloat, Part, ShortText, Signature

TrustLevel = Annotated[int, Field(ge=0, le=1_000)]
BlockCount = Annotated[int, Field(ge=0, le=65_536)]


class PrivacyPolicy(Part):
    """Blocks [0, ``private_blocks``), the last ``private_last_blocks`` blocks, the
    embedding and the head may run only on nodes with trust >= ``trusted_level``.

    The default value protects nothing. Block indices are half-open like segments.
    """

    trusted_level: TrustLevel = 0
    private_blocks: BlockCount = 0
    """The first k blocks: they see near-raw input."""
    private_last_blocks: BlockCount = 0
    """The last k blocks: their output is the model's answer (the planner's tail option)."""

    def is_private(self, block: int, num_layers: int) -> bool:
        """True when ``block`` (0-based, of a model with ``num_layers`` blocks) is protected."""
        return block < self.private_blocks or block >= num_layers - self.private_last_blocks

    def block_trust(self, num_layers: int) -> tuple[int, ...]:
        """Per block, the trust this policy requires (0 where it requires none)."""
        return tuple(
            self.trusted_level if self.is_private(block, num_layers) else 0
            for block in range(num_layers)
        )

    def protects_any(self, start: int, end: int, num_layers: int) -> bool:
        """True when the non-empty block range ``[start, end)`` holds a protected block."""
        return start < self.private_blocks or end > num_layers - self.private_last_blocks

    def stricter(self, other: PrivacyPolicy) -> PrivacyPolicy:
        """The policy that satisfies both: the higher level and the more protected blocks.

        A worker combines its configured policy with the published one this way, so a
        published policy can tighten a node's rules but never relax them.
        """
        return PrivacyPolicy(
            trusted_level=max(self.trusted_level, other.trusted_level),
            private_blocks=max(self.private_blocks, other.private_blocks),
            private_last_blocks=max(self.private_last_blocks, other.private_last_blocks),
        )

    def private_text(self) -> str:
        """The protected blocks in words, e.g. ``blocks [0, 2) and the last 1``."""
        blocks = f"blocks [0, {self.private_blocks})"
        if self.private_last_blocks:
            blocks += f" and the last {self.private_last_blocks}"
        return blocks

    def describe(self) -> str:
        """E.g. ``trust >= 2 for blocks [0, 2)`` (for logs and refusals)."""
        return f"trust >= {self.trusted_level} for {self.private_text()}"

class PrivacyPolicySet(Message):
    """Event (retained on ``policy/privacy``): the privacy policy in force.

    The message carries a `PrivacyPolicy` rather than being one: the policy is the value
    that planners and workers compare and combine (``stricter``), while ``set_at_s`` and
    ``reason`` only describe this announcement of it; keeping them apart means the policy
    a worker holds in force never carries a time or reason that belongs to no message.
    """

    policy: PrivacyPolicy
    set_at_s: NonNegativeFloat = 0.0
    """Unix time the policy was set."""
    reason: ShortText = ""
    signature: Signature = ""
