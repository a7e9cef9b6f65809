"""Tensor- and file-name conventions shared by checkpoints and shard stores (torch-free:
the control services read shard manifests through this module).

Hugging Face checkpoints of one architecture spell their tensor names with or without
a wrapper prefix (``transformer.h.0.attn...`` or ``h.0.attn...``; ``bert.encoder...``
or ``encoder...``; ``model.layers.0...``). edgesplit works on *canonical* names: the
wrapper prefix removed. Block tensors are further addressed relative to their block
(``self_attn.q_proj.weight`` in block 3); everything that is not in a block belongs to
the entry (embeddings, final norm, head, pooler).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Weight files in pickle formats: never unpickled (a pickle can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_WRAPPER_PREFIXES = ("transformer.", "bert.", "model.")
_BLOCK_PATTERN = re.compile(r"^(?:layers|h|encoder\.layer)\.(\d+)\.(.+)$")
# Buffers some exporters write that are not weights (recomputed from the config).
_IGNORED_ENTRY_NAMES = ("embeddings.position_ids",)
_IGNORED_BLOCK_NAMES = ("attn.bias", "attn.masked_bias", "self_attn.rotary_emb.inv_freq")


def canonical_name(name: str) -> str:
    """Strip one wrapper prefix: ``transformer.h.0.ln_1.weight`` -> ``h.0.ln_1.weight``."""
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def is_ignored(name: str) -> bool:
    """True for buffers that are not weights (e.g. BERT's ``embeddings.position_ids``)."""
    located = block_of(name)
    if located is None:
        return canonical_name(name) in _IGNORED_ENTRY_NAMES
    return located[1] in _IGNORED_BLOCK_NAMES


def block_of(name: str) -> tuple[int, str] | None:
    """``(block index, name within the block)`` for a block tensor, else None."""
    match = _BLOCK_PATTERN.match(canonical_name(name))
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def split_names(names: Iterable[str]) -> tuple[list[str], dict[int, list[str]]]:
    """Partition original tensor names into entry names and names per block index.

    Ignored buffers are dropped. Lists are sorted so the result is deterministic.
    """
    entry: list[str] = []
    blocks: dict[int, list[str]] = {}
    for name in sorted(names):
        if is_ignored(name):
            continue
        located = block_of(name)
        if located is None:
            entry.append(name)
        else:
            blocks.setdefault(located[0], []).append(name)
    return entry, blocks
