"""Where a model's tensors come from: the protocol runtimes load weights through.

A ``TensorSource`` hands out the entry's tensors (embeddings, final norm, head) and one
block's tensors at a time, so a segment materialises only the blocks it runs. The HF
folder reader is ``shared.model.checkpoint.Checkpoint``; a shard store can implement
the same protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from shared.model.config import ModelConfig


@runtime_checkable
class TensorSource(Protocol):
    """Read-only access to one model's config, tokenizer file and fp32 tensors."""

    @property
    def config(self) -> ModelConfig:
        """The model's hyper-parameters."""
        ...

    @property
    def tokenizer_path(self) -> Path:
        """Path of the model's ``tokenizer.json``."""
        ...

    def entry_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors outside every block, keyed by canonical name (``wte.weight``,
        ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``, ``embeddings.*``)."""
        ...

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Tensors of block ``index``, keyed by name within the block
        (``self_attn.q_proj.weight``). Raises CheckpointError for an unknown block."""
        ...
