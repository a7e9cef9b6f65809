"""Key/value caches of a segment's attention blocks.

Each block keeps K and V as ``[kv_heads, T, head_dim]`` for the T tokens seen so far.
Storage grows by amortised doubling, never preallocated to the context length. A cache
can export and import whole blocks (keyed by absolute block index) so KV entries can
follow blocks when split points move, and truncate to forget the latest tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from shared.errors import ModelError

INITIAL_CAPACITY = 16
"""Tokens a block cache first allocates room for (services/worker/kv_budget.py mirrors the growth)."""


class CacheMismatch(ModelError):
    """A cache does not fit the request: wrong length, block, head count or shape."""


class BlockCache:
    """K and V of one block, [kv_heads, length, head_dim] each, grown by doubling."""

    def __init__(
        self, num_kv_heads: int, head_dim: int, device: str | torch.device = "cpu"
    ) -> None:
        self._key = torch.empty(num_kv_heads, 0, head_dim, device=device)
        self._value = torch.empty(num_kv_heads, 0, head_dim, device=device)
        self.length = 0  # tokens cached

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add T new tokens ([kv_heads, T, head_dim] each); return all cached K, V views."""
        if key.shape != value.shape or key.shape[0::2] != self._key.shape[0::2]:
            raise CacheMismatch(
                f"K/V of shape {tuple(key.shape)}/{tuple(value.shape)} do not fit a cache of "
                f"[{self._key.shape[0]}, T, {self._key.shape[2]}]"
            )
        needed = self.length + key.shape[1]
        if needed > self._key.shape[1]:
            self._grow(max(needed, 2 * self._key.shape[1], INITIAL_CAPACITY))
        self._key[:, self.length : needed] = key
        self._value[:, self.length : needed] = value
        self.length = needed
        return self.view()

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached K and V, [kv_heads, length, head_dim] each (views, not copies)."""
        return self._key[:, : self.length], self._value[:, : self.length]

    def truncate(self, length: int) -> None:
        """Forget every token at position ``length`` and later."""
        if not 0 <= length <= self.length:
            raise CacheMismatch(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    @property
    def nbytes(self) -> int:
        """Bytes of the cached tokens' K and V (not of spare capacity)."""
        key, value = self.view()
        return key.nelement() * key.element_size() + value.nelement() * value.element_size()

    @property
    def capacity(self) -> int:
        """Tokens there is room for without growing."""
        return int(self._key.shape[1])

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated for K and V, spare capacity included (what the cache costs)."""
        return self._key.nelement() * self._key.element_size() + self._value.nelement() * self._value.element_size()

    def _grow(self, capacity: int) -> None:
        heads, _, head_dim = self._key.shape
        for name in ("_key", "_value"):
            old = getattr(self, name)
            new = torch.empty(heads, capacity, head_dim, dtype=old.dtype, device=old.device)
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)


class SegmentCache:
    """The block caches of one segment, keyed by absolute block index."""

    def __init__(
        self,
        blocks: Iterable[int],
        num_kv_heads: int,
        head_dim: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self._num_kv_heads, self._head_dim, self._device = num_kv_heads, head_dim, device
        self._blocks = {index: BlockCache(num_kv_heads, head_dim, device) for index in blocks}

    @property
    def blocks(self) -> tuple[int, ...]:
        """Absolute indices of the blocks this cache holds, ascending."""
        return tuple(sorted(self._blocks))

    def block(self, index: int) -> BlockCache:
        """The cache of absolute block ``index``; raises CacheMismatch if not held."""
        try:
            return self._blocks[index]
        except KeyError:
            raise CacheMismatch(
                f"this cache holds blocks {list(self.blocks)}, not block {index}"
            ) from None

    @property
    def length(self) -> int:
        """Tokens cached (the same in every block after a completed forward pass)."""
        return min((cache.length for cache in self._blocks.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes of cached K and V over all blocks."""
        return sum(cache.nbytes for cache in self._blocks.values())

    @property
    def capacity(self) -> int:
        """Tokens every block has room for without growing."""
        return min((cache.capacity for cache in self._blocks.values()), default=0)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes allocated for K and V over all blocks, spare capacity included."""
        return sum(cache.allocated_nbytes for cache in self._blocks.values())

    def truncate(self, length: int) -> None:
        """Forget every token at position ``length`` and later, in every block."""
        for cache in self._blocks.values():
            cache.truncate(length)

    def export(
        self, blocks: Iterable[int] | None = None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Copies of K, V ([kv_heads, length, head_dim]) per absolute block index, on the
        CPU whatever the cache's device (they go to the wire or to another cache).

        ``blocks`` picks a subset (default: all). Raises CacheMismatch for a block not held.
        """
        chosen = self.blocks if blocks is None else sorted(blocks)
        exported = {}
        for index in chosen:
            key, value = self.block(index).view()
            exported[index] = (key.to("cpu", copy=True), value.to("cpu", copy=True))
        return exported

    def import_blocks(self, blocks: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add (or replace) blocks from ``export()`` output.

        Every imported block must hold as many tokens as the blocks already held.
        Raises CacheMismatch for wrong shapes or lengths.
        """
        others = [cache.length for index, cache in self._blocks.items() if index not in blocks]
        lengths = {key.shape[1] for key, _ in blocks.values()} | set(others)
        if len(lengths) > 1:
            raise CacheMismatch(f"imported blocks hold {sorted(lengths)} tokens; they must agree")
        for index, (key, value) in sorted(blocks.items()):
            cache = BlockCache(self._num_kv_heads, self._head_dim, self._device)
            cache.append(key.to(self._device), value.to(self._device))
            self._blocks[index] = cache

    def drop_blocks(self, blocks: Iterable[int]) -> None:
        """Forget the given blocks (after they were exported to another node)."""
        for index in blocks:
            self.block(index)
            del self._blocks[index]
