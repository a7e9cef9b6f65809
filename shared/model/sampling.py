"""Choosing the next token, and the decode-loop rules shared by every entry node.

``Sampler`` is greedy at temperature 0 and otherwise samples from the temperature-scaled,
nucleus-truncated (top-p) distribution with its own seeded ``torch.Generator``, so a
seed gives the same tokens every run. ``check_context`` and ``should_stop`` are the
pure rules the local pipeline and the distributed entry node both apply.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from shared.errors import ConfigError, ContextTooLong


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings: temperature 0 means greedy; top_p in (0, 1]."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True when the next token is always the arg-max."""
        return self.temperature == 0.0


class Sampler:
    """Picks next tokens for one sequence; stateful (its generator advances)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._generator = torch.Generator()
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)

    def next_token(self, logits: torch.Tensor) -> int:
        """The next token id for ``logits`` of shape [V]."""
        logits = logits.detach().float().cpu()
        if self.params.greedy:
            return int(torch.argmax(logits))
        probabilities = torch.softmax(logits / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            probabilities = _nucleus(probabilities, self.params.top_p)
        return int(torch.multinomial(probabilities, 1, generator=self._generator))


def _nucleus(probabilities: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probabilities, order = torch.sort(probabilities, descending=True)
    mass_before = torch.cumsum(sorted_probabilities, dim=-1) - sorted_probabilities
    sorted_probabilities[mass_before >= top_p] = 0.0  # the first token is always kept
    kept = torch.zeros_like(probabilities).scatter(0, order, sorted_probabilities)
    return kept / kept.sum()


def check_context(prompt_tokens: int, max_new_tokens: int, max_positions: int) -> None:
    """Raise before any compute if a request cannot fit the model's context.

    Raises ConfigError for an empty prompt or max_new_tokens < 1, ContextTooLong when
    ``prompt_tokens + max_new_tokens > max_positions``.
    """
    if prompt_tokens < 1:
        raise ConfigError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens > max_positions:
        raise ContextTooLong(
            f"prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens exceeds the "
            f"model's context of {max_positions} tokens"
        )


def should_stop(
    token_id: int,
    generated: int,
    max_new_tokens: int,
    eos_token_ids: Iterable[int],
    stop_at_eos: bool = True,
) -> bool:
    """True when decoding ends after ``token_id``, the ``generated``-th new token
    (counting it): the budget is spent, or it is an end-of-sequence token."""
    if generated >= max_new_tokens:
        return True
    return stop_at_eos and token_id in tuple(eos_token_ids)
