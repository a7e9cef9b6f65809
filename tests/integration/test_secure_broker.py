"""The secure profile on a real Mosquitto (issue #17, acceptance bullets 1 and 2).

A state folder is generated with `creds.init_state` (CA, broker certificate, the
standard identities) plus two workers, and Mosquitto is started with its rendered
secure config on free ports. Refusals: anonymous, a wrong password, no client
certificate, a certificate of another CA, plaintext MQTT on the TLS listener. The ACL
matrix: every role publishes and subscribes on every topic of the registry (its own
instance and another identity's for parameterised topics); only the cells that
`acl.GRANTS` allows succeed, and an operator subscriber on ``edgesplit/{cluster}/#`` sees
no denied publish. Mosquitto 2.0 acknowledges every SUBSCRIBE (even denied ones) and
checks read access per delivered message, so a subscribe cell succeeds when a message
published on that topic reaches the subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiomqtt.client import ProtocolVersion
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.subscribeoptions import SubscribeOptions

from shared.bus import Bus
from shared.config import BusSettings
from shared.errors import ConfigError
from shared.ids import NodeId
from shared.messages import NodeStatus
from shared.security import pki
from shared.security.acl import GRANTS, READ_ALL, Role, Scope
from shared.security.broker import SecureBroker, start_secure_broker
from shared.security.broker_audit import BrokerAudit, ReadGrants
from shared.security.creds import (
    StateDir,
    add_identity,
    client_environment,
    init_state,
    load_registry,
)
from shared.topics import NODE_STATUS, REGISTRY, REQUESTS, ROOT, Topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WORKER, OTHER = "w1", "w2"
"""The worker whose role is tested, and the other identity in 'another's instance' cells."""
FEEDER = "feeder"
"""A test-only user (appended to the generated ACL) that may write every topic: it feeds
the subscribe cells, so they do not depend on which role publishes what."""
CONNECT_TIMEOUT_S = 3


def run(make: Callable[[], Awaitable[None]], timeout_s: float = 60.0) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(timeout_s):
            await make()

    asyncio.run(guarded())


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StateDir, SecureBroker]]:
    root = tmp_path_factory.mktemp("secure-state")
    cluster = "t" + secrets.token_hex(6)
    init_state(root, None, cluster=cluster)
    add_identity(root, WORKER, Role.WORKER, trust=2)
    add_identity(root, OTHER, Role.WORKER, trust=0)
    state = StateDir(root)
    pki.issue(state.ca, state.certs, FEEDER)
    with state.acl.open("a") as acl:
        acl.write(f"\n# test only\nuser {FEEDER}\ntopic write {ROOT}/{cluster}/#\n")
    grants = ReadGrants.of(load_registry(state).identities, cluster)  # the feeder is not judged
    broker = start_secure_broker(state, data_dir=root / "broker", audit=BrokerAudit(grants))
    try:
        yield state, broker
    finally:
        broker.close()


def tls_for(state: StateDir, name: str, ca: pki.CertPair | None = None,
            certs: Path | None = None) -> ssl.SSLContext:  # fmt: skip
    context = ssl.create_default_context(cafile=str(state.ca.cert_file))
    directory = certs or state.certs
    context.load_cert_chain(directory / f"{name}.crt", directory / f"{name}.key")
    return context


def tls_client(state: StateDir, broker: SecureBroker, name: str, suffix: str = "", *,
               port: int | None = None, identifier: str | None = None,
               clean_start: bool = True) -> aiomqtt.Client:  # fmt: skip
    """``name``'s certificate on the control listener (or ``port``). The broker ignores
    ``identifier``: the client id is the username."""
    return aiomqtt.Client("127.0.0.1", port or broker.port,
                          identifier=identifier or f"{name}{suffix}-{secrets.token_hex(3)}",
                          tls_context=tls_for(state, name), protocol=ProtocolVersion.V5,
                          timeout=CONNECT_TIMEOUT_S, clean_start=clean_start)  # fmt: skip


async def connects(**kwargs: Any) -> None:
    async with aiomqtt.Client("127.0.0.1", identifier=f"probe-{secrets.token_hex(3)}",
                              protocol=ProtocolVersion.V5, timeout=CONNECT_TIMEOUT_S,
                              **kwargs):  # fmt: skip
        pass


def audited(broker: SecureBroker) -> dict[str, int]:
    assert broker.audit is not None
    return broker.audit.snapshot()


def counted(broker: SecureBroker, before: dict[str, int], timeout_s: float = 5.0, **more: int) -> None:
    """The broker's audit counts exactly ``more[kind]`` refusals of each kind since
    ``before`` (its log travels through a pipe: wait for it), and no other kind changed."""

    def grown() -> dict[str, int]:
        after = audited(broker)
        return {kind: n - before.get(kind, 0) for kind, n in after.items() if n != before.get(kind, 0)}

    deadline = time.monotonic() + timeout_s
    while any(grown().get(kind, 0) < n for kind, n in more.items()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # nothing more arrives
    assert grown() == {kind: n for kind, n in more.items() if n}, (more, before, audited(broker))


# --- refused connects -------------------------------------------------------------------


def test_identities_connect_with_their_certificate_and_their_password(secure: Any) -> None:
    state, broker = secure
    password = state.credentials(WORKER).password()
    before = audited(broker)
    run(lambda: connects(port=broker.port, tls_context=tls_for(state, WORKER)))
    run(lambda: connects(port=broker.password_port, username=WORKER, password=password))
    time.sleep(0.5)
    assert audited(broker) == before  # accepted connects are no refusals


def test_anonymous_connect_is_refused(secure: Any) -> None:
    _, broker = secure
    before = audited(broker)
    with pytest.raises(MqttConnectError, match="Not authorized"):
        run(lambda: connects(port=broker.password_port))
    counted(broker, before, Connect_refused=1)


def test_wrong_password_is_refused(secure: Any) -> None:
    state, broker = secure
    wrong = state.credentials(OTHER).password()  # a real password, of another identity
    before = audited(broker)
    with pytest.raises(MqttConnectError, match="Not authorized"):
        run(lambda: connects(port=broker.password_port, username=WORKER, password=wrong))
    with pytest.raises(MqttConnectError, match="Not authorized"):
        run(lambda: connects(port=broker.password_port, username=WORKER, password=""))
    counted(broker, before, Connect_refused=2)


def test_tls_without_a_client_certificate_is_refused(secure: Any) -> None:
    state, broker = secure
    no_cert = ssl.create_default_context(cafile=str(state.ca.cert_file))
    before = audited(broker)
    with pytest.raises(aiomqtt.MqttError):
        run(lambda: connects(port=broker.port, tls_context=no_cert))
    counted(broker, before, Tls_refused=1)


def test_a_certificate_of_an_unknown_ca_is_refused(secure: Any, tmp_path: Path) -> None:
    state, broker = secure
    rogue_ca = pki.create_ca(tmp_path / "rogue-ca", name="rogue CA")
    pki.issue(rogue_ca, tmp_path / "rogue", WORKER)  # the right name, the wrong issuer
    context = tls_for(state, WORKER, certs=tmp_path / "rogue")
    before = audited(broker)
    with pytest.raises(aiomqtt.MqttError):
        run(lambda: connects(port=broker.port, tls_context=context))
    counted(broker, before, Tls_refused=1)


def test_plaintext_mqtt_on_the_tls_listener_is_refused(secure: Any) -> None:
    state, broker = secure
    password = state.credentials(WORKER).password()
    before = audited(broker)
    with pytest.raises(aiomqtt.MqttError):
        run(lambda: connects(port=broker.port, username=WORKER, password=password))
    counted(broker, before, Tls_refused=1)


# --- sessions: the client id is the identity ----------------------------------------------


async def receives(client: aiomqtt.Client, payload: bytes, timeout_s: float = 5.0) -> bool:
    """True when ``payload`` arrives on ``client`` within the deadline."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                if bytes(message.payload) == payload:  # type: ignore[arg-type]
                    return True
    return False


def test_no_identity_can_take_over_another_identitys_session(secure: Any) -> None:
    """w1 holds a session on the control and on the data listener. The client identity
    connects with w1's client ids on both (and on the password listener),
    keeping the session (clean start off): the broker makes each taker's client id its own
    username, so w1 stays connected and keeps receiving, and the takers read nothing of
    w1's subscriptions. A second connection of w1 itself does take w1's session: the id
    really is the identity, and the broker's audit counts that one take-over (and none for
    the takers of another identity)."""
    state, broker = secure
    cluster = load_registry(state).cluster
    own = REQUESTS.topic(cluster, node=WORKER)  # only w1 may read it
    password = state.credentials("client").password()

    def taker(port: int, identifier: str) -> aiomqtt.Client:
        if port == broker.password_port:
            return aiomqtt.Client("127.0.0.1", port, username="client", password=password, identifier=identifier,
                                  protocol=ProtocolVersion.V5, timeout=CONNECT_TIMEOUT_S, clean_start=False)  # fmt: skip
        return tls_client(state, broker, "client", port=port, identifier=identifier, clean_start=False)

    victim_ids = {broker.port: WORKER, broker.data_port: pki.subject_username(WORKER), broker.password_port: WORKER}
    before = audited(broker)

    async def scenario() -> None:
        async with tls_client(state, broker, WORKER) as control, \
                tls_client(state, broker, WORKER, port=broker.data_port) as data, \
                tls_client(state, broker, FEEDER) as feeder:  # fmt: skip
            for victim in (control, data):
                await victim.subscribe(own, qos=1)
            for port, identifier in victim_ids.items():
                async with taker(port, identifier) as thief:
                    await thief.subscribe(own, qos=1)  # the client may not read it anyway
                    marker = f"after taker on {port}".encode()
                    await feeder.publish(own, marker, qos=1)
                    for victim in (control, data):  # still connected, still subscribed
                        assert await receives(victim, marker), (port, identifier)
                    assert not await receives(thief, marker, timeout_s=1.0)
            # w1 again, any id asked for: the broker gives it the id w1, and w1's first session goes
            async with tls_client(state, broker, WORKER, identifier="anything-else"):
                with pytest.raises(aiomqtt.MqttError):
                    await receives(control, b"never", timeout_s=5.0)

    run(scenario)
    # the takers of another identity's ids took nothing over; w1's own second connection did;
    # and each taker's subscription to w1's requests (the client may not read them) is counted
    counted(broker, before, Session_takenover=1, Subscribe_denied=len(victim_ids))


# --- the ACL matrix -----------------------------------------------------------------------

Cell = tuple[str, str]
"""(topic pattern, instance): instance is "-" (no parameter), "own" or "other"."""


def identity_of(role: Role, state: StateDir) -> str:
    if role is Role.WORKER:
        return WORKER
    return load_registry(state).of_role(role)[0].name


def cells(identity: str, cluster: str) -> dict[Cell, str]:
    """Every (topic, instance) cell of the registry and its concrete topic for ``identity``."""
    found: dict[Cell, str] = {}
    for pattern, topic in REGISTRY.items():
        if not topic.params:
            found[(pattern, "-")] = topic.topic(cluster)
            continue
        for instance, name in (("own", identity), ("other", OTHER)):
            found[(pattern, instance)] = topic.topic(cluster, **dict.fromkeys(topic.params, name))
    return found


def allowed(role: Role, topic: Topic[Any], instance: str, publish: bool) -> bool:
    """What the ACL is meant to allow (acl.GRANTS): the matrix checks Mosquitto enforces it."""
    if not publish and role in READ_ALL:
        return True
    grant = GRANTS[role].get(topic)
    scope = None if grant is None else (grant.publish if publish else grant.subscribe)
    if scope is None:
        return False
    if scope is Scope.BROKER:  # only `services/broker/status`: neither "own" nor "other" is it
        return False
    return scope is Scope.ANY or instance in ("own", "-")


async def drain_until(client: aiomqtt.Client, sentinel: bytes) -> list[bytes]:
    """Payloads received until ``sentinel`` (QoS 1 from one publisher arrives in order)."""
    payloads: list[bytes] = []
    async for message in client.messages:
        payload = bytes(message.payload)  # type: ignore[arg-type]
        if payload == sentinel:
            return payloads
        payloads.append(payload)
    raise AssertionError("connection closed before the sentinel")


def test_acl_matrix_publish(secure: Any) -> None:
    """Each role publishes on every cell; the operator's '#' sees exactly the allowed ones."""
    state, broker = secure
    cluster = load_registry(state).cluster
    admin_filter = f"{ROOT}/{cluster}/#"
    sentinel_topic = REGISTRY["policy/privacy"].topic(cluster)
    delivered: list[bytes] = []
    before = audited(broker)

    async def scenario() -> None:
        # on the data listener: its own session, apart from the operator's control session below
        async with tls_client(state, broker, "operator", port=broker.data_port) as admin:
            await admin.subscribe([(admin_filter, SubscribeOptions(qos=1))])
            for role in Role:
                name = identity_of(role, state)
                async with tls_client(state, broker, name) as client:
                    for (pattern, instance), topic in cells(name, cluster).items():
                        await client.publish(topic, f"{role.value}|{pattern}|{instance}", qos=1)
            async with tls_client(state, broker, "operator") as operator:
                await operator.publish(sentinel_topic, b"end", qos=1)
            delivered.extend(await drain_until(admin, b"end"))

    run(scenario)
    got = {tuple(payload.decode().split("|")) for payload in delivered}
    expected = {
        (role.value, pattern, instance)
        for role in Role
        for (pattern, instance) in cells(identity_of(role, state), cluster)
        if allowed(role, REGISTRY[pattern], instance, publish=True)
    }
    assert got - expected == set(), "denied publishes were delivered"
    assert expected - got == set(), "allowed publishes were not delivered"
    cells_tried = sum(len(cells(identity_of(role, state), cluster)) for role in Role)
    counted(broker, before, Publish_denied=cells_tried - len(expected))  # each denial counted once


def test_acl_matrix_subscribe(secure: Any) -> None:
    """Each role subscribes to every cell; the feeder publishes on each; a role receives
    exactly the cells it may read."""
    state, broker = secure
    cluster = load_registry(state).cluster
    received: dict[Role, set[Cell]] = {}
    before = audited(broker)

    async def scenario() -> None:
        for role in Role:
            name = identity_of(role, state)
            topics = cells(name, cluster)
            # a topic this role may read for sure: where its sentinel goes
            readable = next(t for (p, i), t in topics.items() if allowed(role, REGISTRY[p], i, False))
            async with tls_client(state, broker, name) as client, \
                    tls_client(state, broker, FEEDER) as feeder:  # fmt: skip
                await client.subscribe([(t, SubscribeOptions(qos=1)) for t in sorted(set(topics.values()))])
                for (pattern, instance), topic in topics.items():
                    await feeder.publish(topic, f"{pattern}|{instance}", qos=1)
                await feeder.publish(readable, b"end", qos=1)
                payloads = await drain_until(client, b"end")
            received[role] = {tuple(p.decode().split("|")) for p in payloads}  # type: ignore[misc]

    run(scenario)
    for role in Role:
        name = identity_of(role, state)
        expected = {cell for cell in cells(name, cluster)
                    if allowed(role, REGISTRY[cell[0]], cell[1], publish=False)}  # fmt: skip
        assert received[role] - expected == set(), f"{role.value} read topics it may not"
        assert expected - received[role] == set(), f"{role.value} could not read its topics"
    # Mosquitto accepts every one of those subscriptions; the audit counts each it may not read
    beyond = sum(len(set(cells(identity_of(role, state), cluster).values())) - len(received[role]) for role in Role)
    counted(broker, before, Subscribe_denied=beyond)


# --- the project's own Bus on the secure profile ----------------------------------------------


def test_the_bus_connects_with_a_client_certificate(secure: Any) -> None:
    """BusSettings' tls_* files and the data listener (as `up --secure` passes them in
    EDGESPLIT_* variables) reach both connections; the worker identity serves its own
    status. (A password URL suits one-connection tools only: the password listener makes
    the username the client id, so a Bus's two planes there would take each other's
    session.)"""
    state, broker = secure
    cluster = load_registry(state).cluster
    environment = client_environment(state, WORKER, broker.url)
    assert environment["EDGESPLIT_DATA_BROKER_URL"] == broker.data_url
    by_certificate = BusSettings(
        broker_url=broker.url, data_broker_url=broker.data_url, cluster=cluster, client_id=WORKER,
        tls_ca_file=Path(environment["EDGESPLIT_TLS_CA_FILE"]),
        tls_cert_file=Path(environment["EDGESPLIT_TLS_CERT_FILE"]),
        tls_key_file=Path(environment["EDGESPLIT_TLS_KEY_FILE"]),
    )  # fmt: skip
    status = NodeStatus(node=NodeId(WORKER), state="online", trust=2, memory_bytes=10**9, threads=1)

    async def scenario() -> None:
        async with Bus(by_certificate) as bus, bus.subscribe(NODE_STATUS, node=WORKER) as statuses:
            await bus.wait_ready()
            await bus.publish(NODE_STATUS, status, node=WORKER)
            _, received = await statuses.get()
            assert received.node == WORKER
            assert bus.sessions == 2  # one per plane, neither taken over by the other

    run(scenario, timeout_s=30)


def test_unusable_tls_files_are_a_config_error(secure: Any, tmp_path: Path) -> None:
    state, broker = secure
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    settings = BusSettings(broker_url=broker.url, tls_ca_file=state.ca.cert_file,
                           tls_cert_file=garbage, tls_key_file=garbage)  # fmt: skip
    with pytest.raises(ConfigError, match="TLS files"):
        Bus(settings)
