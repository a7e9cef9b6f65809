"""The client library checks a plan's signature before following it (docs/SECURITY.md).

A real Mosquitto (the shared test broker), the roles' Ed25519 keys in a temporary folder
and plans published retained straight onto the plan topic (not through a Bus, which would
sign them itself): unsigned, signed with an HMAC key, signed by the orchestrator's role key
(valid, but not the broadcaster's) and, last, by the broadcaster. A client given the
public keys (the secure profile) follows only the broadcaster's plan and counts the rest;
a one-shot request with only forged plans retained ends in NoAnswer naming the refusals.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest

from services.cli.client import Client, ClientOptions, NoAnswer, request
from shared import codec
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import GenerateRequest, Plan, Segment
from shared.security.role_keys import ensure_role_keys, load_signer, private_key_file
from shared.topics import PLAN

pytestmark = pytest.mark.timeout(60)


def _plan(epoch: int, entry: str) -> Plan:
    return Plan(epoch=epoch, model_id="tiny-llama", entry_node=entry,  # type: ignore[arg-type]
                segments=(Segment(node=entry, start=0, end=4),))  # type: ignore[arg-type]  # fmt: skip


async def _retain(broker: LocalBroker, cluster: str, *plans: Plan) -> None:
    """Publish ``plans`` retained, in order, exactly as signed (QoS 1, one connection)."""
    async with Bus(BusSettings(broker_url=broker.url, cluster=cluster)) as bus:
        await bus.wait_ready()
        for plan in plans:
            payload = codec.encode(plan, origin=f"p{secrets.token_hex(4)}", seq=1)
            await bus.connection("control").publish(PLAN.topic(cluster), payload, PLAN.qos, True)


async def _first_plan(client: Client, timeout_s: float = 10.0) -> None:
    """Until the client has followed a plan (the library offers no event for it), at most
    ``timeout_s``: AssertionError after."""
    for _ in range(int(timeout_s / 0.05)):
        if client.current_plan() is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no plan followed within {timeout_s} s; refused: {client.refusals()}")


def _forgeries(keys: Path) -> tuple[Plan, ...]:
    orchestrator = load_signer(private_key_file(keys, "orchestrator"))
    return (
        _plan(5, "mallory"),  # unsigned
        _plan(6, "mallory").sign("k" * 32),  # an HMAC, whatever its key
        orchestrator.sign(_plan(7, "mallory")),  # a real role key, not the one for plans
    )


def test_a_client_follows_only_the_broadcasters_plan_and_counts_the_rest(
    broker: LocalBroker, cluster: str, tmp_path: Path
) -> None:
    keys = ensure_role_keys(tmp_path / "keys")
    genuine = load_signer(private_key_file(keys, "broadcaster")).sign(_plan(3, "car"))
    settings = BusSettings(broker_url=broker.url, cluster=cluster, role_keys_dir=keys / "public")

    async def scenario() -> tuple[Plan | None, dict[str, int], Plan | None]:
        async with Client(options=ClientOptions(settings, timeout_s=5)) as client:
            await _retain(broker, cluster, *_forgeries(keys))
            await _retain(broker, cluster, genuine)
            await _first_plan(client)
            followed = client.current_plan()
            # a forged plan of a later epoch afterwards does not replace it either
            await _retain(broker, cluster, _plan(9, "mallory").sign("k" * 32))
            await asyncio.sleep(1.0)
            return followed, client.refusals(), client.current_plan()

    followed, refusals, after = asyncio.run(scenario())
    assert followed == genuine and after == genuine
    assert refusals == {"Plan_forged": 2, "Plan_role": 1, "Plan_unsigned": 1}, refusals


def test_a_request_with_only_a_forged_plan_retained_is_a_typed_no_answer(
    broker: LocalBroker, cluster: str, tmp_path: Path
) -> None:
    keys = ensure_role_keys(tmp_path / "keys")
    settings = BusSettings(broker_url=broker.url, cluster=cluster, role_keys_dir=keys / "public")
    asyncio.run(_retain(broker, cluster, _forgeries(keys)[-1]))  # the orchestrator's signature

    def make(client: str) -> GenerateRequest:
        return GenerateRequest(request_id=secrets.token_hex(8), reply_to=client,  # type: ignore[arg-type]
                               token_ids=(1, 2, 3), max_new_tokens=2, timeout_s=5)  # fmt: skip

    with pytest.raises(NoAnswer, match="Plan_role"):
        asyncio.run(request(ClientOptions(settings, timeout_s=5), make))


def test_without_keys_on_the_open_profile_a_client_checks_nothing(broker: LocalBroker, cluster: str) -> None:
    """Nothing to check with (no key given): the client follows the retained plan, as before."""
    unsigned = _plan(2, "car")

    async def scenario() -> Plan | None:
        async with Client(options=ClientOptions(BusSettings(broker_url=broker.url, cluster=cluster))) as client:
            await _retain(broker, cluster, unsigned)
            await _first_plan(client)
            assert client.refusals() == {}
            return client.current_plan()

    assert asyncio.run(scenario()) == unsigned
