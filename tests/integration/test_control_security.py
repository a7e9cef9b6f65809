"""A hostile broker client against a running stack (issue #17, items 2 and 3).

The whole stack runs (workers, monitor, split reviser, broadcaster, orchestrator as
processes on a real Mosquitto, the tiny model from real safetensors) with one control
key and the operator's identity registry. The attacker can connect (the open profile:
what the secure profile's ACLs would stop is exactly what is shown here to be refused
by the receivers anyway) but does not hold the key. It sends forged plans, PREPAREs,
NodeDowns, emulation commands, privacy policies and rollout requests (signed with its
own key), an unsigned AbortEpoch, a replay of an old correctly signed plan, a ledger
bomb and a node status claiming trust 10. Every one is refused and counted (the
workers' NodeStatus ``refused``, shown by `edgesplit status`), placement keeps the
registry's trust, and the stack keeps answering with the unsplit model's tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.cli.main import main
from shared import codec
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.messages import (
    AbortEpoch,
    CapacityProfile,
    EmulationCommand,
    EpochLedger,
    Message,
    NodeDown,
    NodeStatus,
    Plan,
    PrepareEpoch,
    PrivacyPolicy,
    PrivacyPolicySet,
    RolloutRequested,
    Segment,
)
from shared.topics import (
    CAPACITY,
    EMULATION,
    EPOCH_COMMANDS,
    NODE_STATUS,
    PLAN,
    POLICY,
    PROFILE_EVENTS,
    ROLLOUT_LEDGER,
    ROLLOUTS,
    Topic,
)
from tests.integration.cluster import settings_for
from tests.integration.fullstack import Stack

pytestmark = pytest.mark.integration
BLOCKS_2 = 380e3
"""Memory for two blocks of the tiny model and their caches: a plan needs three nodes."""
NODES = (("car", 2, 0.5, BLOCKS_2), ("rsu", 1, 1.0, BLOCKS_2), ("mec", 0, 1.0, BLOCKS_2),
         ("spare", 1, 1.0, BLOCKS_2))  # fmt: skip
ATTACKER_KEY = "attacker-key-not-the-cluster-key"
PROMPT = [5, 17, 9]


def registry_text(cluster: str) -> str:
    """The operator's identities.toml: every node's trust as the topology gives it."""
    lines = [f'cluster = "{cluster}"']
    for node, trust, *_ in NODES:
        lines += ["[[identity]]", f'name = "{node}"', 'role = "worker"', f"trust = {trust}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def site(broker: LocalBroker, tmp_path: Path) -> Iterator[Stack]:
    torch.set_num_threads(1)
    cluster = "sec" + tmp_path.name[-8:].replace("_", "")
    registry = tmp_path / "identities.toml"
    registry.write_text(registry_text(cluster))
    stack = Stack(broker.url, cluster, tmp_path, NODES, "car",
                  service_env={"EDGESPLIT_IDENTITIES_FILE": str(registry)})  # fmt: skip
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


async def send_raw(bus: Bus, topic: Topic[Any], message: Message, retain: bool = False, **params: str) -> None:
    """Publish ``message`` as it is (no signing by the bus): an unsigned or replayed one."""
    payload = codec.encode(message, origin=bus.origin, seq=1)
    await bus.connection("control").publish(topic.topic(bus.cluster, **params), payload, topic.qos, retain)


async def retained_status(bus: Bus, node: str) -> NodeStatus:
    async with bus.subscribe(NODE_STATUS, node=node) as statuses, asyncio.timeout(10):
        message: NodeStatus = (await statuses.get()).message
        return message


async def refusals_of(site: Stack, nodes: tuple[str, ...], wanted: set[str], timeout_s: float) -> dict[str, dict[str, int]]:
    """Each node's ``refused`` counters once every node shows all of ``wanted`` (or the deadline)."""
    seen: dict[str, dict[str, int]] = {}
    async with Bus(site.settings) as bus, bus.subscribe(NODE_STATUS) as statuses:
        try:
            async with asyncio.timeout(timeout_s):
                while not all(wanted <= set(seen.get(n, {})) for n in nodes):
                    _, status = await statuses.get()
                    seen[status.node] = dict(status.refused)
        except TimeoutError:
            pass
    return seen


async def attack(site: Stack, first: Plan) -> Plan:
    """Every hostile message; returns the plan the test's own (legitimate) rollout made."""
    hostile = settings_for(site.broker_url, site.cluster, plan_signing_key=ATTACKER_KEY)
    async with Bus(hostile, origin="mallory") as bus:
        # trust claim: mec (registry trust 0) says it has trust 10
        claim = (await retained_status(bus, "mec")).model_copy(update={"trust": 10})
        await bus.publish(NODE_STATUS, claim, node="mec")
        claimed_at = time.time()
        # forged plan and PREPARE: everything, entry included, on the untrusted mec
        on_mec = Plan(epoch=first.epoch + 10, model_id=first.model_id, entry_node="mec",  # type: ignore[arg-type]
                      segments=(Segment(node="mec", start=0, end=6),))  # type: ignore[arg-type]  # fmt: skip
        await send_raw(bus, PLAN, on_mec.sign(ATTACKER_KEY))  # not retained: clients read plan/current
        await bus.publish(EPOCH_COMMANDS, PrepareEpoch(epoch=on_mec.epoch, plan=on_mec.sign(ATTACKER_KEY)))
        await send_raw(bus, EPOCH_COMMANDS, AbortEpoch(epoch=first.epoch + 1, reason="forged"))  # unsigned
        await bus.publish(PROFILE_EVENTS, NodeDown(node=first.segments[-1].node, at_s=time.time(),  # type: ignore[arg-type]
                                                   reason="offline"))  # fmt: skip
        await bus.publish(EMULATION, EmulationCommand(command_id=99, slowdown=50.0), node="car")
        await bus.publish(POLICY, PrivacyPolicySet(policy=PrivacyPolicy(), set_at_s=time.time()))  # retained
        await bus.publish(ROLLOUTS, RolloutRequested(decision_id=77_001, plan=on_mec))
        await bus.publish(ROLLOUT_LEDGER, EpochLedger(highest_epoch=2**63 - 2))  # a ledger bomb
        profile = await profile_after(bus, claimed_at)
        assert {n.node: n.trust for n in profile.nodes}["mec"] == 0  # the registry's, not the claim
    # A legitimate rollout (the cluster key: as the orchestrator would) to a second epoch
    # while the ledger bomb is retained, then a replay of the first, correctly signed plan.
    used = {s.node for s in first.segments}
    spare = next(node for node, *_ in NODES if node not in used)
    moved = first.segments[1].node
    segments = tuple(s.model_copy(update={"node": spare}) if s.node == moved else s for s in first.segments)
    async with Bus(site.settings) as bus:
        # a correctly signed ledger bomb (a leaked key): too far ahead to be believed
        await bus.publish(ROLLOUT_LEDGER, EpochLedger(highest_epoch=2**63 - 3))
        await bus.publish(ROLLOUTS, RolloutRequested(decision_id=77_002, plan=first.model_copy(
            update={"segments": segments, "signature": ""})))  # fmt: skip
    second = await site.wait_served(lambda plan: plan.epoch > first.epoch, timeout_s=60)
    async with Bus(hostile, origin="mallory") as bus:
        await send_raw(bus, PLAN, first)  # the replay: valid signature, an old epoch
    return second


async def profile_after(bus: Bus, at_s: float) -> CapacityProfile:
    async with bus.subscribe(CAPACITY) as profiles, asyncio.timeout(20):
        while True:
            _, profile = await profiles.get()
            if profile.as_of_s > at_s + 1.0 and any(n.node == "mec" for n in profile.nodes):
                return profile


def test_a_hostile_client_cannot_steer_the_stack(site: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    first = asyncio.run(site.wait_served(lambda plan: True, timeout_s=30))
    second = asyncio.run(attack(site, first))
    assert second.entry_node == "car" and second.segments[0].node == "car"  # private block 0 stays
    assert second.signature_ok(site.settings.plan_signing_key or "")

    everyone = {"Plan_forged", "PrepareEpoch_forged", "AbortEpoch_unsigned", "NodeDown_forged",
                "PrivacyPolicySet_forged", "Plan_replayed"}  # fmt: skip
    serving = tuple(sorted({s.node for s in second.segments}))
    seen = asyncio.run(refusals_of(site, serving, everyone, timeout_s=30))
    for node in serving:
        assert everyone <= set(seen.get(node, {})), (node, seen)
    assert asyncio.run(refusals_of(site, ("car",), {"EmulationCommand_forged"}, 15))["car"]["EmulationCommand_forged"] == 1

    # the stack keeps answering, with exactly the unsplit model's tokens, on the new epoch
    result = asyncio.run(site.generate("after-attack", PROMPT, 6, timeout_s=60))
    assert tuple(result.token_ids) == site.expected(PROMPT, 6)
    now = asyncio.run(site.current_plan())  # nothing forged committed (the orchestrator may re-plan)
    assert now.epoch >= second.epoch and now.entry_node == "car"
    assert now.signature_ok(site.settings.plan_signing_key or "")

    code = main(["status", "--json", "--broker", site.broker_url, "--cluster", site.cluster])
    state = json.loads(capsys.readouterr().out)
    assert code == 0
    shown = {node["node"]: node["refused"] for node in state["nodes"]}
    assert shown["car"]["Plan_forged"] >= 1 and shown["car"]["EmulationCommand_forged"] == 1
    services = state["refused"]  # the control services' own refusals
    assert {"RolloutRequested_forged", "EpochLedger_forged", "EpochLedger_implausible", "Plan_forged",
            "PrivacyPolicySet_forged"} <= set(services["broadcaster"]), services  # fmt: skip
    assert {"PrivacyPolicySet_forged", "NodeDown_forged", "Plan_forged"} <= set(services["orchestrator"]), services
    assert services["monitor"]["NodeStatus_trust_ignored"] >= 1, services
    site.stop()
    assert "refused RolloutRequested (bad signature" in site.log("broadcaster")
    assert "refused EpochLedger (bad signature" in site.log("broadcaster")
    assert "refused EpochLedger (ledger highest epoch" in site.log("broadcaster")
    assert "refused PrivacyPolicySet (bad signature" in site.log("orchestrator")
