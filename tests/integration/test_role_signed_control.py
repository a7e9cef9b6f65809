"""Per-role control keys on a running stack (issue #17, item 3: "signed by their role's key").

The whole stack runs (workers, monitor, split reviser, broadcaster, orchestrator as
processes, tiny llama from real safetensors) with role keys: the broadcaster, the
orchestrator and the monitor each sign with their own Ed25519 key, every process holds
only the public keys, the workers hold the cluster HMAC key too (it derives frame keys).
The broker is the open one (no ACL), so every forgery reaches every worker: what a
compromised worker can sign (the cluster key it holds) and what a compromised monitor
or orchestrator can sign (its own role key) are both refused as plans or PREPAREs, and
counted; the stack keeps answering with the unsplit model's tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shared.broker import LocalBroker
from shared.bus import Bus
from shared.messages import Plan, PrepareEpoch, Segment
from shared.messages.base import sign
from shared.security.role_keys import ensure_role_keys, load_signer, private_key_file
from shared.topics import EPOCH_COMMANDS, PLAN
from tests.integration.cluster import TEST_SIGNING_KEY, settings_for
from tests.integration.fullstack import Stack
from tests.integration.test_control_security import refusals_of, send_raw

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]
BLOCKS = 600e3
NODES = (("car", 2, 0.5, BLOCKS), ("rsu", 1, 1.0, BLOCKS), ("mec", 0, 1.0, BLOCKS))
PROMPT = [5, 17, 9]


@pytest.fixture
def site(broker: LocalBroker, tmp_path: Path) -> Iterator[Stack]:
    torch.set_num_threads(1)
    cluster = "roles" + tmp_path.name[-8:].replace("_", "")
    stack = Stack(broker.url, cluster, tmp_path, NODES, "car", role_keys=ensure_role_keys(tmp_path / "keys"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


async def forge(site: Stack, first: Plan) -> None:
    """Plans and PREPAREs for a later epoch, everything on the untrusted mec, signed by the
    keys a compromised process holds (not retained: clients read plan/current)."""
    assert site.role_keys is not None
    on_mec = Plan(epoch=first.epoch + 10, model_id=first.model_id, entry_node="mec",  # type: ignore[arg-type]
                  segments=(Segment(node="mec", start=0, end=first.segments[-1].end),))  # type: ignore[arg-type]  # fmt: skip
    monitor = load_signer(private_key_file(site.role_keys, "monitor"))
    orchestrator = load_signer(private_key_file(site.role_keys, "orchestrator"))
    async with Bus(settings_for(site.broker_url, site.cluster), origin="mallory") as bus:
        await send_raw(bus, PLAN, sign(on_mec, TEST_SIGNING_KEY))  # a worker's key: the cluster key
        await send_raw(bus, PLAN, orchestrator.sign(on_mec))  # another role's key
        await send_raw(bus, EPOCH_COMMANDS, sign(PrepareEpoch(epoch=on_mec.epoch, plan=sign(on_mec, TEST_SIGNING_KEY)),
                                                 TEST_SIGNING_KEY))  # fmt: skip
        await send_raw(bus, EPOCH_COMMANDS, monitor.sign(PrepareEpoch(epoch=on_mec.epoch + 1,
                                                                      plan=monitor.sign(on_mec))))  # fmt: skip


def test_only_the_broadcasters_key_signs_a_plan_a_worker_accepts(site: Stack) -> None:
    first = asyncio.run(site.wait_served(lambda plan: True, timeout_s=30))
    assert first.signature.startswith("ed25519:")  # the broadcaster's role key signed it
    asyncio.run(forge(site, first))
    wanted = {"Plan_forged", "Plan_role", "PrepareEpoch_forged", "PrepareEpoch_role"}
    serving = tuple(sorted({first.entry_node, *(s.node for s in first.segments)}))
    seen = asyncio.run(refusals_of(site, serving, wanted, timeout_s=30))
    for node in serving:
        assert wanted <= set(seen.get(node, {})), (node, seen)
    now = asyncio.run(site.current_plan())
    assert now.entry_node == "car" and now.signature.startswith("ed25519:")  # nothing forged took hold
    result = asyncio.run(site.generate("after-forgery", PROMPT, 6, timeout_s=60))
    assert tuple(result.token_ids) == site.expected(PROMPT, 6)
