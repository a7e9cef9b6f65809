"""KV budgets end to end: real workers over a real Mosquitto, a small budget on one node.

Three workers (car, rsu, mec) hold [0,1) [1,3) [3,4) of a 4-block llama; rsu's KV budget
takes exactly three requests of 3 + 40 tokens. A burst of twelve against an entry that
runs eight at once: the first eight are admitted by count, only three of them fit the
budget, so at least five are `overloaded` (before any work); the other four wait in the
entry's queue (default bound, at least 64: none is `busy`) and start as slots free, but
the budget is still full then, so they are `overloaded` too; exactly three complete,
with the tokens of the in-process unsplit model (the twelve arrive well within one
40-token generation). Then the stack serves normally.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.client import ClientOptions, request
from services.worker.kv_budget import request_kv_bytes
from shared.broker import LocalBroker
from shared.errors import Busy, Overloaded
from shared.messages import GenerateRequest, RequestFinished
from shared.model.pipeline import LocalPipeline
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from tests.integration.cluster import WorkerCluster, make_plan, publish_plan, settings_for, started

pytestmark = pytest.mark.integration
SEGMENTS = (("car", 0, 1), ("rsu", 1, 3), ("mec", 3, 4))
PROMPT_TOKENS, NEW_TOKENS, FITS = 3, 40, 3


class BudgetSystem:
    def __init__(self, broker: LocalBroker, root: Path) -> None:
        self.model_dir = write_tiny_checkpoint("llama", root / "model", layers=4, seed=3)
        write_shards(self.model_dir, root / "shards")
        self.settings = settings_for(broker.url, "itkvbudget")
        self.workers = WorkerCluster(broker.url, "itkvbudget", root / "shards", root)
        self.local = LocalPipeline(self.model_dir, ())  # the unsplit model
        per_token = self.local.config.kv_bytes_per_token_per_block()
        self.rsu_budget = FITS * request_kv_bytes(per_token, PROMPT_TOKENS, NEW_TOKENS, 2) + per_token

    def start(self) -> None:
        self.workers.start("car", "--trust", "2", "--max-in-flight", "8")
        self.workers.start("rsu", "--trust", "1", "--kv-budget-bytes", str(self.rsu_budget))
        self.workers.start("mec", "--trust", "0")
        plan = make_plan(1, "car", SEGMENTS, self.settings.plan_signing_key)
        rejected = asyncio.run(publish_plan(self.settings, plan))
        assert not rejected, {node: self.workers.log_tail(node) for node in rejected}


@pytest.fixture(scope="module")
def system(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BudgetSystem]:
    yield from started(BudgetSystem(broker, tmp_path_factory.mktemp("kvbudget")))


def _prompt(index: int) -> list[int]:
    return [10 + index, 20 + index, 30 + index]


async def _one(system: BudgetSystem, rid: str, prompt: list[int]) -> RequestFinished | Exception:
    def make(client: str) -> GenerateRequest:
        return GenerateRequest(request_id=rid, reply_to=client, token_ids=tuple(prompt),  # type: ignore[arg-type]
                               max_new_tokens=NEW_TOKENS)  # fmt: skip
    try:
        return await request(ClientOptions(system.settings, timeout_s=60.0), make)  # type: ignore[return-value]
    except (Busy, Overloaded) as error:
        return error


def test_a_burst_past_the_kv_budget_is_overloaded_and_the_admitted_complete_exactly(system: BudgetSystem) -> None:
    async def burst() -> list[RequestFinished | Exception]:
        return await asyncio.gather(*(_one(system, f"kv{i}", _prompt(i)) for i in range(12)))

    results = asyncio.run(burst())
    finished = {i: r for i, r in enumerate(results) if isinstance(r, RequestFinished)}
    overloaded = [r for r in results if isinstance(r, Overloaded)]
    busy = [r for r in results if isinstance(r, Busy)]
    assert len(finished) == FITS and len(overloaded) >= 8 - FITS, results
    assert len(finished) + len(overloaded) == 12 and not busy, results  # every one answered, typed
    assert all("does not fit node rsu" in str(error) for error in overloaded), overloaded
    for index, result in finished.items():
        assert result.token_ids == system.local.generate(_prompt(index), NEW_TOKENS).token_ids, index

    async def after() -> list[RequestFinished | Exception]:  # the budget is free again
        return await asyncio.gather(*(_one(system, f"after{i}", _prompt(20 + i)) for i in range(FITS)))

    for index, again in enumerate(asyncio.run(after())):
        assert isinstance(again, RequestFinished), again
        assert again.token_ids == system.local.generate(_prompt(20 + index), NEW_TOKENS).token_ids


def test_status_shows_kv_in_use_against_each_budget(system: BudgetSystem) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "services.cli", "status", "--json", "--broker", system.settings.broker_url,
         "--cluster", "itkvbudget"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    nodes = {node["node"]: node for node in json.loads(shown.stdout)["nodes"]}
    assert nodes["rsu"]["kv_budget_bytes"] == system.rsu_budget
    assert nodes["car"]["kv_budget_bytes"] > system.rsu_budget  # the default: the memory left
