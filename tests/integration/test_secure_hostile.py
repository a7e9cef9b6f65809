"""Hostile identities against a running SECURE stack (issue #17, acceptance bullet 3).

`edgesplit up --secure` runs the whole stack (three workers car / rsu / mec, monitor,
split reviser, broadcaster, orchestrator) on its own Mosquitto with the secure profile
(TLS client certificates, identity = username = client id, per-identity ACLs, a control
key per state folder). The attackers hold valid identities of that state folder:
``mallory``, a client, and ``eve``, a compromised worker (registry trust 0; the attacker
is its process, since the broker gives each identity one session). One test per bullet of the
issue's list. A publish the ACL denies is shown to reach no one: an operator subscriber
on the cluster's ``#`` never sees it (Mosquitto acknowledges denied publishes and
subscribes alike and then delivers nothing), and `edgesplit status` counts it: the
broker's ``Publish_denied``, which `up --secure` reads from Mosquitto's log
(shared/security/broker_audit.py). Where a message does reach a receiver (a
worker's own status, frames a worker may send), the receiver refuses it and status
counts it. After every case the stack still answers with the unsplit model's tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from typing import Any

import aiomqtt
import numpy as np
import pytest

from services.cli.client import Client, ClientOptions
from shared import codec
from shared.frame_headers import ActivationHeader, KvHeader, ReleaseHeader
from shared.messages import (
    AbortEpoch,
    DecisionRecorded,
    EmulationCommand,
    EpochLedger,
    NodeDown,
    NodeStatus,
    Plan,
    PrivacyPolicy,
    PrivacyPolicySet,
    RequestFinished,
    Segment,
    TokenGenerated,
)
from shared.messages.base import sign
from shared.security.frame_keys import PeerKeys, derive_frame_key
from shared.security.pki import subject_username
from shared.tensor_frame import encode_frame
from shared.topics import (
    ACTIVATIONS,
    DECISIONS,
    EMULATION,
    EPOCH_COMMANDS,
    FINISHED,
    NODE_STATUS,
    PLAN,
    POLICY,
    PROFILE_EVENTS,
    REPLIES,
    REQUESTS,
    ROLLOUT_LEDGER,
    match,
)
from tests.integration.secure_site import ATTACKER, VICTIM, WATCHER, WORKER_ATTACKER, SecureSite

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
HIDDEN = 64
"""The tiny llama's hidden size (`up --model tiny-llama`)."""
FAKE_KEY = "f" * 64
"""A key that is not the cluster's: what an attacker without the key signs with."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureSite]:
    site = SecureSite(tmp_path_factory.mktemp("hostile"), "hostile" + secrets.token_hex(3))
    try:
        site.start()
        site.assert_exact()  # serving before any attack
        # the stack's own processes subscribe only to what their ACL lets them read
        assert "Subscribe_denied" not in broker_refused(site.status()), site.status()["refused"]
        yield site
    finally:
        site.stop()


def retained(site: SecureSite, topic: str) -> Any:
    """The retained message of ``topic``, read as mallory (a client may read plans and
    node statuses)."""

    async def read() -> Any:
        async with site.raw_client(ATTACKER) as client, asyncio.timeout(10):
            await client.subscribe(topic, qos=1)
            async for message in client.messages:
                return codec.decode(bytes(message.payload)).message  # type: ignore[arg-type]
        raise AssertionError(f"nothing retained on {topic}")

    return asyncio.run(read())


def current_plan(site: SecureSite) -> Plan:
    plan = retained(site, PLAN.topic(site.cluster))
    assert isinstance(plan, Plan)
    return plan


def retained_status(site: SecureSite, node: str) -> NodeStatus:
    status = retained(site, NODE_STATUS.topic(site.cluster, node=node))
    assert isinstance(status, NodeStatus)
    return status


def denied(site: SecureSite, sends: list[tuple[str, str, Any, bool]]) -> None:
    """Each (identity, topic, message or bytes, retain) is published and never delivered."""
    for _, topic, _, _ in sends:  # real topics of the cluster, not a typo nobody reads
        found = match(topic)
        assert found is not None and found[1] == site.cluster, topic

    payloads = [payload if isinstance(payload, bytes) else
                codec.encode(payload, origin=f"forger{secrets.token_hex(4)}", seq=1)
                for _, _, payload, _ in sends]  # fmt: skip

    async def scenario() -> list[Any]:
        async with site.watch() as watch:
            for (name, topic, _, retain), payload in zip(sends, payloads, strict=True):
                await site.publish(name, topic, payload, retain)
        sent = set(zip((topic for _, topic, _, _ in sends), payloads, strict=True))
        return [(d.topic, d.retain) for d in watch.seen if (d.topic, d.payload) in sent]

    before = broker_denied(site.status())
    delivered = asyncio.run(scenario())
    assert delivered == [], delivered
    # and status counts each: the broker's refusals, read from its log by `up --secure`
    status = site.wait_status(lambda seen: broker_denied(seen) >= before + len(sends), timeout_s=15)
    assert broker_denied(status) - before >= len(sends), (before, status["refused"].get("broker"))


def broker_refused(status: dict[str, Any]) -> dict[str, int]:
    """What the secure broker refused, as `edgesplit status` shows it (the service `broker`)."""
    return dict(status["refused"].get("broker", {}))


def broker_denied(status: dict[str, Any]) -> int:
    """The publishes the broker's ACL denied, as `edgesplit status` shows them."""
    return broker_refused(status).get("Publish_denied", 0)


def forged_plan(plan: Plan) -> Plan:
    """Every block, the entry too, on the untrusted eve, far ahead; signed with a wrong key."""
    return Plan(epoch=plan.epoch + 1000, model_id=plan.model_id, entry_node=WORKER_ATTACKER,  # type: ignore[arg-type]
                segments=(Segment(node=WORKER_ATTACKER, start=0, end=plan.segments[-1].end),),  # type: ignore[arg-type]
                ).sign(FAKE_KEY)  # fmt: skip


# --- one case per bullet --------------------------------------------------------------


def test_forged_plan_is_never_delivered(site: SecureSite) -> None:
    before = current_plan(site)
    assert before.signature.startswith("ed25519:")  # the broadcaster's role key, not the cluster key
    forged, topic = forged_plan(before), PLAN.topic(site.cluster)
    denied(site, [(ATTACKER, topic, forged, True), (WORKER_ATTACKER, topic, forged, True)])
    assert current_plan(site) == before
    site.assert_exact()


def test_replayed_plan_is_never_delivered(site: SecureSite) -> None:
    genuine = current_plan(site)  # correctly signed by the broadcaster: a replay needs no key
    older = genuine.model_copy(update={"epoch": max(0, genuine.epoch - 1)})
    topic = PLAN.topic(site.cluster)
    denied(site, [(ATTACKER, topic, genuine, True), (WORKER_ATTACKER, topic, genuine, True),
                  (WORKER_ATTACKER, topic, older, True)])  # fmt: skip
    assert current_plan(site) == genuine
    site.assert_exact()


def test_ledger_bomb_is_never_delivered(site: SecureSite) -> None:
    bomb, topic = EpochLedger(highest_epoch=2**63 - 2), ROLLOUT_LEDGER.topic(site.cluster)
    denied(site, [(ATTACKER, topic, sign(bomb, FAKE_KEY), True), (WORKER_ATTACKER, topic, sign(bomb, FAKE_KEY), True)])
    site.assert_exact()


def test_trust_claim_is_ignored_for_placement_and_counted(site: SecureSite) -> None:
    # eve announces itself like mec, claiming trust 10 (memory for no block: eve has no process
    # to serve one, and the claim, not a ghost node, is what is tested)
    real = retained_status(site, "mec").model_copy(update={"node": WORKER_ATTACKER, "trust": 10, "memory_bytes": 1,
                                                           "segments": (), "epoch": None})  # fmt: skip
    payload = codec.encode(real, origin=WORKER_ATTACKER, seq=1)
    # eve may publish its own status (and only its own): the claim arrives, and is ignored
    asyncio.run(site.publish(WORKER_ATTACKER, NODE_STATUS.topic(site.cluster, node=WORKER_ATTACKER), payload, True))
    # speaking for another node is refused by the ACL: car's status is not replaced
    car = NODE_STATUS.topic(site.cluster, node="car")
    fake = retained_status(site, "car").model_copy(update={"state": "offline", "trust": 0})
    denied(site, [(WORKER_ATTACKER, car, fake, True), (ATTACKER, car, fake, True)])

    def counted(status: dict[str, Any]) -> bool:
        return status["refused"].get("monitor", {}).get("NodeStatus_trust_ignored", 0) >= 1

    status = site.wait_status(counted)
    assert counted(status), status["refused"]
    assert status["measured"][WORKER_ATTACKER]["trust"] == 0  # the registry's, not the claim
    assert status["plan"]["entry_node"] == "car" and status["plan"]["segments"][0]["node"] == "car"
    site.assert_exact()


def test_forged_privacy_policy_is_never_delivered(site: SecureSite) -> None:
    policy = sign(PrivacyPolicySet(policy=PrivacyPolicy(), set_at_s=time.time() + 3600), FAKE_KEY)
    topic = POLICY.topic(site.cluster)
    denied(site, [(ATTACKER, topic, policy, True), (WORKER_ATTACKER, topic, policy, True)])
    site.assert_exact()


def test_reading_another_clients_prompts_and_answers_gets_nothing(site: SecureSite) -> None:
    prompt = (7, 31, 2, 99)
    wildcard = [REQUESTS.filter(site.cluster), REPLIES.topic(site.cluster, client=VICTIM),
                FINISHED.topic(site.cluster), f"edgesplit/{site.cluster}/#"]  # fmt: skip

    async def eavesdrop(name: str, seen: list[str], subscribed: asyncio.Event) -> None:
        async with site.raw_client(name) as client:
            for topic in wildcard:
                await client.subscribe(topic, qos=1)
            subscribed.set()
            async for message in client.messages:
                seen.append(str(message.topic))

    async def scenario() -> tuple[dict[str, list[str]], list[str], RequestFinished]:
        stolen: dict[str, list[str]] = {ATTACKER: [], WORKER_ATTACKER: []}
        ready = {name: asyncio.Event() for name in stolen}
        async with site.watch() as watch, asyncio.TaskGroup() as group:
            spies = [group.create_task(eavesdrop(name, stolen[name], ready[name])) for name in stolen]
            for event in ready.values():
                await asyncio.wait_for(event.wait(), 10)
            result = await site.generate(prompt, 6)
            await asyncio.sleep(1.0)
            for spy in spies:
                spy.cancel()
        return stolen, [d.topic for d in watch.seen], result

    before = broker_refused(site.status()).get("Subscribe_denied", 0)
    stolen, published, result = asyncio.run(scenario())
    assert tuple(result.token_ids) == site.expected(prompt, 6)
    # Mosquitto accepted all eight subscriptions and delivered nothing private; status counts them
    status = site.wait_status(lambda seen: broker_refused(seen).get("Subscribe_denied", 0) >= before + 8)
    assert broker_refused(status).get("Subscribe_denied", 0) - before == 2 * len(wildcard), broker_refused(status)
    private = ("/requests", f"/clients/{VICTIM}/replies", "/requests/finished")
    assert any(topic.endswith(private) for topic in published), published  # they were there to read
    assert not [t for t in stolen[ATTACKER] if t.endswith((*private, "/activations"))], stolen[ATTACKER]
    # the compromised worker is not the entry: it reads no prompt, reply or finished report
    assert not [t for t in stolen[WORKER_ATTACKER] if t.endswith(private)], stolen[WORKER_ATTACKER]


def test_injected_reply_into_another_client_is_never_delivered(site: SecureSite) -> None:
    topic = REPLIES.topic(site.cluster, client=VICTIM)
    token = TokenGenerated(request_id="feedfacefeedface", index=0, token_id=1, text="pwned")  # type: ignore[arg-type]
    done = RequestFinished(request_id="feedfacefeedface", finish_reason="length",  # type: ignore[arg-type]
                           token_ids=(1,), text="pwned",  # type: ignore[arg-type]
                           ttft_s=0.1, tpot_s=0.1)
    denied(site, [(ATTACKER, topic, token, False), (ATTACKER, topic, done, False),
                  (ATTACKER, FINISHED.topic(site.cluster), done, False)])  # fmt: skip
    site.assert_exact()


def forged_frames(plan: Plan, src: str, key: bytes) -> dict[str, list[bytes]]:
    """Activation, KV and release frames for every node of ``plan``, claiming ``src``."""
    rng, frames = np.random.default_rng(5), dict[str, list[bytes]]()
    for segment in plan.segments:
        request_id, target = secrets.token_hex(8), segment.start
        activation = ActivationHeader(request_id=request_id, step=0, epoch=plan.epoch, seq=1, target=target,  # type: ignore[arg-type]
                                      pos=0, last_only=False, pass_id=secrets.randbits(62), src=src,  # type: ignore[arg-type]
                                      sent_at=time.time())  # fmt: skip
        kv = KvHeader(request_id=request_id, step=1, epoch=plan.epoch, seq=2, target=target,  # type: ignore[arg-type]
                      blocks=(target,), pos=3, ack_step=1, old_epoch=plan.epoch, pass_id=1, src=src)  # type: ignore[arg-type]  # fmt: skip
        release = ReleaseHeader(request_id=request_id, step=0, epoch=plan.epoch, seq=3, target=target,  # type: ignore[arg-type]
                                src=src, sent_at=time.time())  # type: ignore[arg-type]  # fmt: skip
        frames[str(segment.node)] = [
            encode_frame(activation, rng.standard_normal((3, HIDDEN)).astype(np.float32), key),
            encode_frame(kv, rng.standard_normal((1, 2, 2, 3, 16)).astype(np.float32), key),
            encode_frame(release, np.zeros((0, HIDDEN), np.float32), key),
        ]
    return frames


def forged_counts(status: dict[str, Any]) -> int:
    return sum(status["frames_forged"].values())


def test_injected_frames_and_kv_are_refused(site: SecureSite) -> None:
    plan = current_plan(site)
    outsider = forged_frames(plan, "car", secrets.token_bytes(32))
    to_topic = {node: ACTIVATIONS.topic(site.cluster, node=node) for node in outsider}
    # a client may not publish frames at all
    denied(site, [(ATTACKER, to_topic[node], frame, False) for node, frames in outsider.items() for frame in frames])
    before = forged_counts(site.status())
    # the compromised worker may send frames (the data plane needs it): without the epoch's
    # key it claims the hop's genuine sender, with the key (a worker holds the cluster secret,
    # so it derives the epoch key) it names itself, the wrong sender for every hop it does not feed
    signing_key = (site.state.root / "signing.key").read_text().strip()
    epoch_key = derive_frame_key(signing_key, plan.epoch, plan.signature)

    def fed_by_attacker(node: str) -> bool:  # the genuine sender of that hop: not a forgery
        start = next(segment.start for segment in plan.segments if segment.node == node)
        before_it = [segment.node for segment in plan.segments if segment.end == start]
        return (before_it[0] if before_it else plan.entry_node) == WORKER_ATTACKER or node == WORKER_ATTACKER

    keyed = {node: frames for node, frames in forged_frames(plan, WORKER_ATTACKER, epoch_key).items()
             if not fed_by_attacker(node)}  # fmt: skip
    # with the epoch key AND its own frame key, eve claims each hop's genuine sender: the
    # pair key of that sender and the receiver needs one of their private keys, so the best
    # eve can compute (its own X25519 secret with the sender's, or with the receiver's,
    # announced key) does not verify
    eve = PeerKeys(WORKER_ATTACKER)
    sender_of = {str(segment.node): next((str(s.node) for s in plan.segments if s.end == segment.start),
                                         str(plan.entry_node)) for segment in plan.segments}  # fmt: skip
    for node in {node for pair in sender_of.items() for node in pair}:
        assert eve.learn(node, retained_status(site, node).frame_public_key)
    impersonated: dict[str, list[bytes]] = {}
    for node, sender in sender_of.items():
        if WORKER_ATTACKER in (node, sender):
            continue
        for key in (eve.key(epoch_key, sender, node), eve.key(epoch_key, WORKER_ATTACKER, node)):
            assert key is not None
            impersonated.setdefault(node, []).extend(forged_frames(plan, sender, key)[node])
    assert impersonated, plan
    sends = [(to_topic[node], frame) for forgeries in (outsider, keyed, impersonated)
             for node, frames in forgeries.items() for frame in frames]  # fmt: skip

    async def inject() -> None:
        async with site.raw_client(WORKER_ATTACKER, data=True) as client:  # frames: the data listener
            for topic, frame in sends:
                await client.publish(topic, frame, qos=1)

    asyncio.run(inject())
    status = site.wait_status(lambda seen: forged_counts(seen) >= before + len(sends), timeout_s=20)
    assert forged_counts(status) - before >= len(sends), (len(sends), status["frames_forged"])  # telemetry
    assert keyed, plan  # some hop where eve is the wrong sender, even with the epoch's key
    site.assert_exact()


def test_forged_node_down_abort_epoch_and_emulation_are_never_delivered(site: SecureSite) -> None:
    plan = current_plan(site)
    node_down = sign(NodeDown(node="rsu", at_s=time.time(), reason="offline"), FAKE_KEY)  # type: ignore[arg-type]
    abort = sign(AbortEpoch(epoch=plan.epoch + 1, reason="forged"), FAKE_KEY)
    slow = sign(EmulationCommand(command_id=99, slowdown=50.0), FAKE_KEY)
    sends: list[tuple[str, str, Any, bool]] = []
    for name in (ATTACKER, WORKER_ATTACKER):
        sends += [(name, PROFILE_EVENTS.topic(site.cluster), node_down, False),
                  (name, EPOCH_COMMANDS.topic(site.cluster), abort, False),
                  (name, EMULATION.topic(site.cluster, node="car"), slow, False),
                  (name, EMULATION.topic(site.cluster, node=WORKER_ATTACKER), slow, False)]  # fmt: skip
    denied(site, sends)
    assert current_plan(site) == plan
    site.assert_exact()


@pytest.mark.parametrize("victim, data", [("broadcaster", False), ("car", False), ("car", True)])
def test_session_take_over_is_impossible_and_the_service_keeps_its_session(site: SecureSite, victim: str,
                                                                         data: bool) -> None:  # fmt: skip
    """mallory connects asking for a service's MQTT client ids, the one the service's bus
    asks for (``{cluster}-{origin}-{plane}``) and the one the broker gives it (on the
    control listener the identity, on the data listener the certificate's subject),
    keeping the session (clean start off). The broker makes mallory's own username its client id: mallory gets a
    session of its own, the service is not disconnected (no "connection lost" in its log,
    no Last Will), mallory reads nothing and its forged plan is delivered to no one, and
    the stack keeps answering exactly."""
    plane = "data" if data else "control"
    identifiers = (f"{site.cluster}-{victim}-{plane}", subject_username(victim) if data else victim)
    plan = current_plan(site)
    got: list[str] = []
    lost_before = site.log(victim).count(f"{plane} connection to")

    async def take_over() -> None:
        for identifier in identifiers:
            async with site.raw_client(ATTACKER, identifier=identifier, clean_start=False, data=data) as client:
                await client.publish(PLAN.topic(site.cluster), codec.encode(forged_plan(plan), origin=ATTACKER, seq=1),
                                     qos=1)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.5):
                        async for message in client.messages:
                            got.append(str(message.topic))

    async def scenario() -> tuple[list[Any], RequestFinished]:
        async with site.watch() as watch:
            async with asyncio.TaskGroup() as group:
                group.create_task(take_over())
                await asyncio.sleep(0.5)
                result = await site.generate((3, 1, 4, 1, 5), 6, timeout_s=90)  # during the attempt
        status_topic = NODE_STATUS.topic(site.cluster, node=victim)
        return [d.topic for d in watch.seen if d.topic == PLAN.topic(site.cluster)
                or (d.topic == status_topic and b"offline" in d.payload)], result  # fmt: skip

    seen, result = asyncio.run(scenario())
    print(f"take-over of {identifiers}: mallory received {len(got)} messages")
    assert got == [], got  # nothing of the service's subscriptions reached mallory
    assert seen == [], seen  # its publish was denied, and the service left no Last Will
    assert site.log(victim).count(f"{plane} connection to") == lost_before  # never disconnected
    assert "taken over" not in site.log(victim)  # and it counts no take-over: mallory was refused
    assert "Session_takenover" not in site.status()["refused"].get(victim, {})
    assert tuple(result.token_ids) == site.expected((3, 1, 4, 1, 5), 6)
    assert current_plan(site) == plan
    site.assert_exact()


def test_a_compromised_worker_writing_into_a_clients_replies_is_not_believed(site: SecureSite) -> None:
    """eve (a worker: the ACL must let workers answer any client) writes a forged final
    answer and forged tokens for alice's running request into alice's reply topic, once
    unsealed and once with a made-up MAC. They are delivered (the watcher sees them), and
    alice's client drops them: only its entry knows the request's reply key. Without that
    check the forged RequestFinished would end the request with eve's tokens."""
    prompt, length = (2, 7, 1, 8), 40
    forged_ids = (0,) * length

    async def scenario() -> tuple[tuple[int, ...], dict[str, int], int]:
        async with site.watch() as watch, site.raw_client(WORKER_ATTACKER) as eve:
            options = ClientOptions(site.settings(VICTIM), timeout_s=90)
            async with Client(options=options) as client:
                stream = client.generate(prompt, max_new_tokens=length)
                async for token in stream:
                    if token.index == 0:  # the request is running: forge its answer now
                        rid, topic = token.request_id, REPLIES.topic(site.cluster, client=VICTIM)
                        finished = RequestFinished(request_id=rid, token_ids=forged_ids, text="pwned",
                                                   finish_reason="length", ttft_s=0.1, tpot_s=0.1)  # fmt: skip
                        fake = TokenGenerated(request_id=rid, index=1, token_id=0, text="pwned")
                        for reply in (fake, finished, fake.model_copy(update={"mac": "ab" * 32}),
                                      finished.model_copy(update={"mac": "ab" * 32})):  # fmt: skip
                            await eve.publish(topic, codec.encode(reply, origin="car", seq=1), qos=1)
                assert stream.result is not None
                refusals = client.refusals()
            delivered = len(watch.carrying(b"pwned"))
        return tuple(stream.result.token_ids), refusals, delivered

    tokens, refusals, delivered = asyncio.run(scenario())
    assert delivered == 4  # the ACL let them through to alice's topic
    assert tokens == site.expected(prompt, length)  # alice got her entry's answer, not eve's
    assert refusals.get("Reply_forged", 0) >= 1, refusals
    site.assert_exact()


def retained_decisions(site: SecureSite) -> list[DecisionRecorded]:
    """The decision records retained in their slots, read by an operator."""

    async def read() -> list[DecisionRecorded]:
        found: list[DecisionRecorded] = []
        async with site.raw_client(WATCHER) as client:
            await client.subscribe(DECISIONS.filter(site.cluster), qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    async for message in client.messages:
                        found.append(codec.decode(bytes(message.payload)).message)  # type: ignore[arg-type]
        return sorted(found, key=lambda record: record.decision_id)

    return asyncio.run(read())


def test_a_replayed_decision_record_is_refused_and_the_taken_over_orchestrator_recovers(site: SecureSite) -> None:
    """A genuine decision record (signed by the orchestrator: a replay needs no key) is
    re-published into its slot. As mallory or eve the ACL denies it. As the orchestrator
    itself (a stolen credential) it is delivered, and it takes over the orchestrator's
    control session (the identity is the client id): every worker refuses the record, as
    stale when it was issued more than ``max_message_age_s`` before the replay, else as a
    replay (the same revision, live), having accepted the orchestrator's genuine
    republications of it (its revision is above 1, and nothing else was refused); the
    orchestrator counts the take-over, takes its session back and keeps serving."""
    records = retained_decisions(site)
    assert records, "no decision retained: the first plan's decision should be"
    record = max(records, key=lambda r: (r.revision, r.decision_id))  # the first plan's: its outcome too
    assert record.revision >= 2, records  # decided, then republished at least once
    slot = DECISIONS.topic(site.cluster, slot=str(record.decision_id % 16))
    denied(site, [(ATTACKER, slot, record, True), (WORKER_ATTACKER, slot, record, True)])
    workers = ("car", "rsu", "mec")

    def replays(status: dict[str, Any]) -> dict[str, int]:  # a worker's refusals are in its node entry
        return {node["node"]: sum(node["refused"].get(f"DecisionRecorded_{why}", 0) for why in ("replayed", "stale"))
                for node in status["nodes"] if node["node"] in workers}  # fmt: skip

    assert replays(site.status()) == dict.fromkeys(workers, 0)

    async def replay() -> None:
        for attempt in range(3):  # the orchestrator takes its session back within ~0.1 s
            try:
                await site.publish("orchestrator", slot, record, retain=True)
                return
            except aiomqtt.MqttError:
                if attempt == 2:
                    raise

    async def replayed() -> list[Any]:
        async with site.watch() as watch:
            await replay()
        return [d for d in watch.seen if d.topic == slot]

    assert len(asyncio.run(replayed())) >= 1  # the ACL lets the orchestrator's identity publish there

    def counted(status: dict[str, Any]) -> bool:
        return (all(count >= 1 for count in replays(status).values())
                and status["refused"].get("orchestrator", {}).get("Session_takenover", 0) >= 1)  # fmt: skip

    status = site.wait_status(counted)
    assert counted(status), (replays(status), status["refused"])
    assert replays(status) == dict.fromkeys(workers, 1)  # the replay, and no genuine record, refused
    assert "taken over" in site.log("orchestrator")
    assert [r for r in retained_decisions(site) if r.decision_id == record.decision_id] == [record]  # still genuine
    site.assert_exact()
