"""KV memory budgets: what a request's KV caches cost, and who may still take them.

Every worker has a KV budget (``WorkerSettings.kv_budget_bytes``; by default its memory
left after the weights of the blocks the plan gives it, as the planner counts memory:
weights + KV <= ``memory_bytes``, docs/cost-model; never below ``KV_FLOOR_BYTES``). Two
guards keep the caches inside it:

- The entry admits a request only when its KV fits every node of the pipeline
  (`KvLedger`): each admitted request reserves what its caches will hold at their
  largest (prompt + ``max_new_tokens`` tokens plus the spare room `BlockCache`'s
  doubling may add: `capacity_bound`) on each node,
  in proportion to the blocks the node holds; the budgets of the other nodes come from
  their (retained) `NodeStatus`. Past it the request is refused as ``overloaded`` before
  any work.
- Each node refuses to grow a cache past its own budget (`KvBudget.check`, on the compute
  thread before a forward allocates): the request fails with `KvOverBudget` (the entry
  answers ``overloaded``), and the caches already there are untouched.

The arithmetic is pure and mirrors `shared/model/kv_cache.py` (tests check it against
real caches).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from shared.errors import Overloaded
from shared.model.config import FP32_BYTES, ModelConfig
from shared.model.kv_cache import INITIAL_CAPACITY
from shared.planning.route import Route

KV_FLOOR_BYTES = 64 * 2**20
"""The least default KV budget: emulated topologies give tiny models memory figures that
only steer the planner (deploy/topologies/adaptive-tiny.toml: two blocks' weights, no
more); a configured ``kv_budget_bytes`` is taken as it is."""


class KvOverBudget(Overloaded):
    """Caching a request's K/V here would take the node past its KV budget."""


def grown_capacity(capacity: int, needed: int) -> int:
    """The token capacity of a block cache of ``capacity`` after it must hold ``needed``
    tokens (`BlockCache.append`: amortised doubling, at least INITIAL_CAPACITY)."""
    if needed <= capacity:
        return capacity
    return max(needed, 2 * capacity, INITIAL_CAPACITY)


def capacity_for(prompt_tokens: int, total_tokens: int) -> int:
    """The capacity (tokens) a cache reaches for a prefill of ``prompt_tokens`` followed by
    one token at a time up to ``total_tokens``."""
    capacity = grown_capacity(0, max(1, prompt_tokens))
    while capacity < total_tokens:
        capacity = grown_capacity(capacity, capacity + 1)
    return capacity


def capacity_bound(total_tokens: int) -> int:
    """The most capacity (tokens) a cache reaches holding at most ``total_tokens``, whatever
    its first prefill (a replay prefills prompt + tokens so far): doubling from k tokens
    stops at k * 2**m with k * 2**(m-1) <= total - 1, so at most 2 * (total - 1)."""
    return max(INITIAL_CAPACITY, total_tokens, 2 * (total_tokens - 1))


def request_kv_bytes(kv_bytes_per_token_block: int, prompt_tokens: int, max_new_tokens: int,
                     blocks: int) -> int:  # fmt: skip
    """The most bytes a request's caches hold on a node with ``blocks`` blocks (replays
    included: `capacity_bound`)."""
    return capacity_bound(prompt_tokens + max_new_tokens) * kv_bytes_per_token_block * blocks


def default_kv_budget(memory_bytes: int, config: ModelConfig, blocks: int) -> int:
    """The memory a node has left after the weights of ``blocks`` blocks (the planner fits
    weights and KV within ``memory_bytes``), at least ``KV_FLOOR_BYTES``."""
    weights = blocks * config.block_parameter_count() * FP32_BYTES
    return max(KV_FLOOR_BYTES, memory_bytes - weights)


def over_budget(
    reserved: Mapping[str, int], blocks: Mapping[str, int], budgets: Mapping[str, int | None],
    per_token_block: int, prompt_tokens: int, max_new_tokens: int,
) -> tuple[str, int, int] | None:  # fmt: skip
    """The first node (sorted) whose budget a new request would exceed, as (node, bytes
    it would then hold, its budget); None when it fits everywhere. ``reserved``: bytes
    already reserved per node; ``blocks``: the blocks each node of the pipeline holds;
    ``budgets``: each node's budget (None or absent: not known, not limited here)."""
    for node in sorted(blocks):
        budget = budgets.get(node)
        if budget is None:
            continue
        need = request_kv_bytes(per_token_block, prompt_tokens, max_new_tokens, blocks[node])
        held = reserved.get(node, 0) + need
        if held > budget:
            return node, held, budget
    return None


def pipeline_blocks(route: Route | None) -> dict[str, int]:
    """The blocks each node of ``route``'s pipeline holds (none without a route)."""
    if route is None:
        return {}
    return {node: segment[1] - segment[0] for node in route.nodes()
            if (segment := route.segment_of(node)) is not None}  # fmt: skip


@dataclass(frozen=True)
class Reservation:
    """An admitted request's KV, as the entry counts it."""

    prompt_tokens: int
    max_new_tokens: int


class KvLedger:
    """The entry's reservations of KV on every node of the pipeline (event loop only).

    ``blocks()``: the blocks each node of the committed pipeline holds; ``budgets()``:
    each node's KV budget as known here (None: not limited here).
    """

    def __init__(self, config: ModelConfig, blocks: Callable[[], Mapping[str, int]],
                 budgets: Callable[[], Mapping[str, int | None]]) -> None:  # fmt: skip
        self.per_token_block = config.kv_bytes_per_token_per_block()
        self._blocks, self._budgets = blocks, budgets
        self.reservations: dict[str, Reservation] = {}

    def reserved(self) -> dict[str, int]:
        """Bytes reserved per node under the current pipeline."""
        blocks = self._blocks()
        return {node: sum(request_kv_bytes(self.per_token_block, r.prompt_tokens, r.max_new_tokens, count)
                          for r in self.reservations.values())
                for node, count in blocks.items()}  # fmt: skip

    def reserve(self, request_id: str, prompt_tokens: int, max_new_tokens: int) -> None:
        """Reserve the request's KV, or raise KvOverBudget naming the node it does not fit."""
        if self.per_token_block == 0:
            return  # an encoder keeps no KV
        found = over_budget(self.reserved(), self._blocks(), self._budgets(), self.per_token_block,
                            prompt_tokens, max_new_tokens)  # fmt: skip
        if found is not None:
            node, held, budget = found
            raise KvOverBudget(
                f"the KV of {prompt_tokens} + {max_new_tokens} tokens does not fit node {node}: "
                f"{held} bytes reserved with it, budget {budget}; retry later"
            )
        self.reservations[request_id] = Reservation(prompt_tokens, max_new_tokens)

    def release(self, request_id: str) -> None:
        self.reservations.pop(request_id, None)


class KvBudget:
    """One node's KV budget over all its segment hosts (thread-safe).

    ``limit_bytes`` None: unlimited. ``in_use()``: the bytes allocated by every host's
    caches and partial imports (set by the worker; hosts of draining epochs count too).
    """

    def __init__(self, limit_bytes: int | None = None,
                 in_use: Callable[[], int] = lambda: 0) -> None:  # fmt: skip
        self.limit_bytes = limit_bytes
        self.in_use = in_use
        self.refused = 0
        self._lock = threading.Lock()

    def check(self, extra_bytes: int, what: str) -> None:
        """Raise KvOverBudget when ``extra_bytes`` more would pass the limit."""
        if extra_bytes <= 0 or self.limit_bytes is None:
            return
        with self._lock:
            held = self.in_use()
            if held + extra_bytes > self.limit_bytes:
                self.refused += 1
                raise KvOverBudget(
                    f"{what}: {extra_bytes} bytes more KV would pass this node's budget "
                    f"({held} of {self.limit_bytes} bytes in use)"
                )
