"""The entry's prompt: token ids given, or text tokenized off the event loop after its
length in characters is checked (services/worker/entry.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from shared.errors import ConfigError, ContextTooLong
from shared.model.config import ModelConfig
from shared.model.tokenizer import TextTokenizer

CHARS_PER_TOKEN_BOUND = 16
"""Characters of prompt text allowed per token the prompt may have (the default of
``max_prompt_chars``). Subword tokenizers average about 4 characters per token on
English and 3 to 6 on code; a token of 16 or more characters is a rare long word or
whitespace run, so a text longer than this many characters per token of the limit would
not fit even if every token were that long. It is refused before the tokenizer spends
time (linear in the text) and memory on it."""


@dataclass(frozen=True, slots=True)
class PromptLimits:
    """``max_tokens``: longest prompt (tokens); ``max_chars``: longest prompt text
    tokenized (characters); ``vocab_size``: ids are in [0, vocab_size)."""

    max_tokens: int
    max_chars: int
    vocab_size: int

    @classmethod
    def of(cls, config: ModelConfig, max_tokens: int, max_chars: int | None = None) -> PromptLimits:
        """The limits for ``config``'s model; ``max_chars`` None: CHARS_PER_TOKEN_BOUND
        per token of the smaller of ``max_tokens`` and the model's context."""
        default_chars = CHARS_PER_TOKEN_BOUND * min(max_tokens, config.max_positions)
        return cls(max_tokens, max_chars or default_chars, config.vocab_size)


async def prompt_ids(
    tokenizer: TextTokenizer,
    limits: PromptLimits,
    prompt: str | None,
    token_ids: tuple[int, ...] | None,
) -> list[int]:
    """The prompt's token ids: ``token_ids``, or ``prompt`` tokenized on a worker thread
    (never on the event loop).

    Raises ContextTooLong for a text over ``limits.max_chars`` characters (before it is
    tokenized) or a prompt over ``limits.max_tokens`` tokens, ConfigError for an id
    outside the vocabulary.
    """
    if token_ids is not None:
        ids = list(token_ids)
    else:
        text = prompt or ""
        if len(text) > limits.max_chars:
            raise ContextTooLong(
                f"prompt of {len(text)} characters exceeds this entry's limit of "
                f"{limits.max_chars} (max_prompt_chars); it was not tokenized"
            )
        ids = await asyncio.to_thread(tokenizer.encode, text)
    bad = [token for token in ids if token >= limits.vocab_size]
    if bad:
        raise ConfigError(f"token id {bad[0]} is outside the vocabulary of {limits.vocab_size}")
    if len(ids) > limits.max_tokens:
        raise ContextTooLong(
            f"prompt of {len(ids)} tokens exceeds this entry's limit of {limits.max_tokens}"
        )
    return ids
