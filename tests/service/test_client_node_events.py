"""The client library checks the monitor's node events before acting on them
(services/cli/client.py), on a real Mosquitto with the roles' Ed25519 keys.

A request goes to the entry ``car`` of a broadcaster-signed plan; a bus subscribed as
``car`` sees it arrive (so the client's subscriptions are confirmed) and answers nothing.
NodeDown events of ``car`` are then published straight onto the events topic, exactly as
signed. Forged ones (unsigned, an HMAC, the orchestrator's role key), a genuine one
replayed after the monitor's NodeJoined, and a genuine one the monitor issued before the
client started (older than ``max_message_age_s``: the client has nothing to compare it
with, its issue time refuses it) are refused and counted, and the request waits out its
deadline (NoAnswer); the monitor's genuine NodeDown makes the client give the entry up
(NoFeasiblePlan: its entry is down and no plan without it came).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import pytest

from services.cli.client import Client, ClientOptions, NoAnswer, NoFeasiblePlan
from shared import codec
from shared.broker import LocalBroker
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import Message, NodeDown, NodeJoined, Plan, Segment
from shared.messages.base import sign
from shared.security.role_keys import ensure_role_keys, load_signer, private_key_file
from shared.topics import PLAN, PROFILE_EVENTS, REQUESTS

pytestmark = pytest.mark.timeout(60)


def _down(at_s: float) -> NodeDown:
    """Detected and issued at ``at_s`` (the monitor's bus stamps ``issued_at_s`` as it publishes)."""
    return NodeDown(node="car", at_s=at_s, reason="heartbeat_timeout", issued_at_s=at_s)  # type: ignore[arg-type]


async def _raw(bus: Bus, topic: str, message: Message, retain: bool = False) -> None:
    """Publish ``message`` exactly as signed (a Bus would sign it itself)."""
    await bus.connection("control").publish(topic, codec.encode(message, origin=f"p{secrets.token_hex(4)}", seq=1),
                                            1, retain)  # fmt: skip


def _scenario(broker: LocalBroker, cluster: str, keys: Path, events: list[Message]) -> tuple[str, dict[str, int]]:
    """(what ended the request, the client's refusals)."""
    settings = BusSettings(broker_url=broker.url, cluster=cluster, role_keys_dir=keys / "public")
    broadcaster = load_signer(private_key_file(keys, "broadcaster"))
    plan = broadcaster.sign(Plan(epoch=3, model_id="tiny-llama", entry_node="car",  # type: ignore[arg-type]
                                 segments=(Segment(node="car", start=0, end=4),)))  # type: ignore[arg-type]  # fmt: skip
    options = ClientOptions(settings, timeout_s=4.0, resync_after_s=30.0, entry_down_wait_s=0.5)

    async def main() -> tuple[str, dict[str, int]]:
        async with (Bus(BusSettings(broker_url=broker.url, cluster=cluster)) as entry,
                    entry.subscribe(REQUESTS, node="car") as requests):  # fmt: skip
            await _raw(entry, PLAN.topic(cluster), plan, retain=True)
            async with Client(options=options) as client:
                task = asyncio.ensure_future(client.generate((1, 2, 3), max_new_tokens=2).collect())
                await asyncio.wait_for(requests.get(), 10)  # the client is subscribed and waiting
                for event in events:
                    await _raw(entry, PROFILE_EVENTS.topic(cluster), event)
                try:
                    await task
                    ended = "answered"
                except (NoAnswer, NoFeasiblePlan) as error:
                    ended = type(error).__name__
                return ended, client.refusals()

    return asyncio.run(main())


def test_forged_and_replayed_node_downs_of_the_entry_are_refused(broker: LocalBroker, cluster: str,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    keys = ensure_role_keys(tmp_path / "keys")
    monitor = load_signer(private_key_file(keys, "monitor"))
    orchestrator = load_signer(private_key_file(keys, "orchestrator"))
    now = time.time()  # the client starts just after: these events are issued after its start
    old_down = monitor.sign(_down(now + 1))
    back = monitor.sign(NodeJoined(node="car", at_s=now + 2, reason="status", issued_at_s=now + 2))  # type: ignore[arg-type]
    events: list[Message] = [_down(now), sign(_down(now), "k" * 32), orchestrator.sign(_down(now)),
                             old_down, back, old_down]  # the genuine NodeDown replayed after the NodeJoined  # fmt: skip
    ended, refusals = _scenario(broker, cluster, keys, events)
    assert ended == "NoAnswer"  # it waited for its entry to the deadline, never gave it up
    assert refusals == {"NodeDown_unsigned": 1, "NodeDown_forged": 1, "NodeDown_role": 1,
                        "NodeDown_replayed": 1}, refusals  # fmt: skip


def test_the_monitors_node_down_of_the_entry_is_acted_on(broker: LocalBroker, cluster: str, tmp_path: Path) -> None:
    keys = ensure_role_keys(tmp_path / "keys")
    genuine = load_signer(private_key_file(keys, "monitor")).sign(_down(time.time()))
    ended, refusals = _scenario(broker, cluster, keys, [genuine])
    assert ended == "NoFeasiblePlan" and refusals == {}, (ended, refusals)  # it gave its entry up


def test_a_node_down_issued_before_the_client_started_is_stale(broker: LocalBroker, cluster: str,
                                                                tmp_path: Path) -> None:  # fmt: skip
    """The monitor's genuine NodeDown of a minute ago, recorded and replayed: the client
    never saw the node's later events (it started after them), so only the age bound
    (30 s by default) tells it is old."""
    keys = ensure_role_keys(tmp_path / "keys")
    recorded = load_signer(private_key_file(keys, "monitor")).sign(_down(time.time() - 60))
    ended, refusals = _scenario(broker, cluster, keys, [recorded])
    assert ended == "NoAnswer" and refusals == {"NodeDown_stale": 1}, (ended, refusals)  # never gave its entry up


def test_a_node_down_issued_before_the_client_started_within_the_bound_is_a_replay(
        broker: LocalBroker, cluster: str, tmp_path: Path) -> None:  # fmt: skip
    """The monitor's genuine NodeDown of 10 s ago (well within the 30 s bound), replayed
    to a client that started after it: no genuine copy can reach a new subscription, so
    the client's start fence refuses it (signing.receiver_fences)."""
    keys = ensure_role_keys(tmp_path / "keys")
    recorded = load_signer(private_key_file(keys, "monitor")).sign(_down(time.time() - 10))
    ended, refusals = _scenario(broker, cluster, keys, [recorded])
    assert ended == "NoAnswer" and refusals == {"NodeDown_replayed": 1}, (ended, refusals)
