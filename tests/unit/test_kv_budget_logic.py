"""KV budgets: the arithmetic against real caches, the entry's ledger, a node's own
refusal to grow past its budget, and the sweeping of idle caches and partial imports."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.worker.compute import SegmentHost, Slowdown
from services.worker.kv_budget import (
    KV_FLOOR_BYTES,
    KvBudget,
    KvLedger,
    KvOverBudget,
    capacity_bound,
    capacity_for,
    default_kv_budget,
    grown_capacity,
    over_budget,
    pipeline_blocks,
    request_kv_bytes,
)
from shared.errors import Overloaded
from shared.model.checkpoint import Checkpoint
from shared.model.kv_cache import BlockCache
from shared.model.runtime import EntryRuntime
from shared.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    return Checkpoint(write_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"), layers=4, seed=2))


def grow_real(prompt: int, total: int) -> int:
    cache = BlockCache(2, 4)
    cache.append(torch.zeros(2, prompt, 4), torch.zeros(2, prompt, 4))
    while cache.length < total:
        cache.append(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
    return cache.capacity


@pytest.mark.parametrize(("prompt", "total"), [(1, 1), (3, 16), (3, 17), (16, 40), (17, 40), (40, 40), (5, 300)])
def test_capacity_mirrors_the_real_block_cache(prompt: int, total: int) -> None:
    assert capacity_for(prompt, total) == grow_real(prompt, total)


def test_capacity_bound_covers_every_first_prefill() -> None:
    for total in range(1, 300):
        worst = max(capacity_for(first, total) for first in range(1, total + 1))
        assert worst <= capacity_bound(total), total
    assert capacity_bound(40) == 78 and capacity_bound(5) == 16


def test_grown_capacity_keeps_room_it_has() -> None:
    assert grown_capacity(32, 20) == 32 and grown_capacity(32, 33) == 64 and grown_capacity(0, 3) == 16
    assert grown_capacity(16, 100) == 100


def test_request_bytes_bound_a_real_segment_cache(model: Checkpoint) -> None:
    host = SegmentHost(model, 1, 3)
    entry = EntryRuntime(model)
    prompt, new = 5, 30
    ids = torch.arange(prompt)
    host.forward("r1", entry.embed(ids, 0).numpy(), 0, Slowdown())
    for position in range(prompt, prompt + new - 1):
        host.forward("r1", entry.embed(torch.tensor([7]), position).numpy(), position, Slowdown())
    per_token = model.config.kv_bytes_per_token_per_block()
    assert per_token == 2 * model.config.num_kv_heads * model.config.head_dim * 4
    allocated = host.kv_allocated_bytes()
    assert allocated == capacity_for(prompt, prompt + new - 1) * per_token * 2
    assert allocated <= request_kv_bytes(per_token, prompt, new, 2)
    assert host.kv_bytes() == (prompt + new - 1) * per_token * 2  # tokens held, no spare room


def test_default_budget_is_the_memory_left_after_the_weights_with_a_floor(model: Checkpoint) -> None:
    weights = 3 * model.config.block_parameter_count() * 4
    assert default_kv_budget(4_000_000_000, model.config, 3) == 4_000_000_000 - weights
    assert default_kv_budget(4_000_000_000, model.config, 0) == 4_000_000_000
    assert default_kv_budget(weights, model.config, 3) == KV_FLOOR_BYTES  # planner-only figures
    assert default_kv_budget(0, model.config, 3) == KV_FLOOR_BYTES


def test_over_budget_names_the_first_node_that_does_not_fit() -> None:
    blocks = {"a": 2, "b": 1, "c": 1}
    need = request_kv_bytes(100, 10, 10, 1)  # one block's worth
    budgets: dict[str, int | None] = {"a": 2 * need, "b": need - 1, "c": None}
    assert over_budget({}, blocks, budgets, 100, 10, 10) == ("b", need, need - 1)
    budgets["b"] = need
    assert over_budget({}, blocks, budgets, 100, 10, 10) is None
    assert over_budget({"a": 1}, blocks, budgets, 100, 10, 10) == ("a", 2 * need + 1, 2 * need)
    assert over_budget({}, {"d": 5}, {}, 100, 10, 10) is None  # an unknown budget is not limited here


def test_ledger_reserves_within_every_budget_and_releases(model: Checkpoint) -> None:
    per_request = request_kv_bytes(model.config.kv_bytes_per_token_per_block(), 6, 10, 2)
    budgets: dict[str, int | None] = {"car": 3 * per_request, "rsu": None}
    ledger = KvLedger(model.config, lambda: {"car": 2, "rsu": 2}, lambda: budgets)
    for rid in ("r1", "r2", "r3"):
        ledger.reserve(rid, 6, 10)
    with pytest.raises(KvOverBudget, match="node car") as refused:
        ledger.reserve("r4", 6, 10)
    assert isinstance(refused.value, Overloaded)
    assert set(ledger.reservations) == {"r1", "r2", "r3"}
    ledger.release("r2")
    ledger.reserve("r4", 6, 10)
    ledger.release("r1")
    budgets["rsu"] = 2 * per_request - 1  # an announced budget that cannot take a third
    with pytest.raises(KvOverBudget, match=f"node rsu: {3 * per_request} bytes reserved with it, budget {2 * per_request - 1}"):
        ledger.reserve("r5", 6, 10)
    assert set(ledger.reservations) == {"r3", "r4"}


def test_a_node_refuses_to_grow_past_its_budget_and_admitted_caches_go_on(model: Checkpoint) -> None:
    entry = EntryRuntime(model)
    per_token = model.config.kv_bytes_per_token_per_block() * 4
    hosts: list[SegmentHost] = []
    budget = KvBudget(40 * per_token, lambda: sum(h.kv_allocated_bytes() for h in hosts))
    host = SegmentHost(model, 0, 4, budget=budget)
    reference = SegmentHost(model, 0, 4)
    hosts.append(host)
    prompt = entry.embed(torch.arange(20), 0).numpy()
    first = host.forward("a", prompt, 0, Slowdown())  # capacity 20 of 40
    assert np.array_equal(first, reference.forward("a", prompt, 0, Slowdown()))
    with pytest.raises(KvOverBudget, match="request b"):
        host.forward("b", entry.embed(torch.arange(21), 0).numpy(), 0, Slowdown())  # 20 + 21 > 40
    assert host.requests() == 1 and budget.refused == 1
    step = entry.embed(torch.tensor([3]), 20).numpy()  # a grows to 40: still within
    assert np.array_equal(host.forward("a", step, 20, Slowdown()), reference.forward("a", step, 20, Slowdown()))
    assert host.kv_allocated_bytes() == 40 * per_token
    with pytest.raises(KvOverBudget):  # nothing more fits; a's cache is untouched
        host.forward("c", entry.embed(torch.arange(2), 0).numpy(), 0, Slowdown())
    assert host.kv_allocated_bytes() == 40 * per_token and host.requests() == 1
    host.release("a")
    host.forward("c", entry.embed(torch.arange(2), 0).numpy(), 0, Slowdown())  # room again


def test_a_partial_import_over_budget_is_refused_and_keeps_nothing(model: Checkpoint) -> None:
    hosts: list[SegmentHost] = []
    heads, dim = model.config.num_kv_heads, model.config.head_dim
    one_block = 2 * heads * 8 * dim * 4  # K and V of 8 tokens
    budget = KvBudget(one_block, lambda: sum(h.kv_allocated_bytes() for h in hosts))
    host = SegmentHost(model, 1, 3, budget=budget)
    hosts.append(host)
    kv = (torch.zeros(heads, 8, dim), torch.zeros(heads, 8, dim))
    assert host.import_kv("r1", {1: kv}) is False  # half of it: waits for block 2
    assert host.kv_allocated_bytes() == one_block
    with pytest.raises(KvOverBudget):
        host.import_kv("r1", {2: kv})
    assert host.kv_allocated_bytes() == one_block


def test_sweep_frees_partial_imports_and_idle_caches_on_their_deadlines(model: Checkpoint) -> None:
    entry = EntryRuntime(model)
    host = SegmentHost(model, 1, 3)
    heads, dim = model.config.num_kv_heads, model.config.head_dim
    kv = (torch.zeros(heads, 4, dim), torch.zeros(heads, 4, dim))
    assert host.import_kv("moved", {1: kv}) is False  # block 2 never comes
    host.forward("live", entry.embed(torch.arange(4), 0).numpy(), 0, Slowdown())
    assert host.sweep(60.0, 60.0) == []  # nothing is that old
    assert host.kv_allocated_bytes() > 0
    assert host.sweep(60.0, 0.0) == ["moved"]  # the partial import's deadline passed
    assert host.requests() == 1  # the live cache stays
    with pytest.raises(Exception, match="no KV cache"):  # a late block 2 no longer completes it
        host.forward("moved", entry.embed(torch.tensor([1]), 4).numpy(), 4, Slowdown())
    assert host.sweep(0.0) == ["live"]
    assert host.kv_allocated_bytes() == 0 and host.requests() == 0


def test_pipeline_blocks_counts_each_nodes_segment() -> None:
    from shared.messages import Plan, Segment
    from shared.planning.route import route_of

    plan = Plan(epoch=1, model_id="m", entry_node="car",  # type: ignore[arg-type]
                segments=(Segment(node="car", start=0, end=1), Segment(node="rsu", start=1, end=4)))  # type: ignore[arg-type]
    assert pipeline_blocks(route_of(plan, 4)) == {"car": 1, "rsu": 3}
    entry_only = Plan(epoch=2, model_id="m", entry_node="car",  # type: ignore[arg-type]
                      segments=(Segment(node="rsu", start=0, end=4),))  # type: ignore[arg-type]
    assert pipeline_blocks(route_of(entry_only, 4)) == {"rsu": 4}  # the entry holds no block
    assert pipeline_blocks(None) == {}
