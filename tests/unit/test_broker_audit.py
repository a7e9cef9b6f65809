"""The secure broker's refusals counted from its log (shared/security/broker_audit.py).

The lines are Mosquitto 2.0.11's, as logged with ``log_type all`` and connection messages
on (copied from real runs of the secure profile): each kind of refusal is counted once per
line, per-packet debug lines are dropped from the kept log, and a flood of one kind keeps
only the first line and every `KEEP_EVERY`-th.
"""

from __future__ import annotations

import io

import pytest

from shared.security.acl import Identity, Role
from shared.security.broker_audit import (
    KEEP_EVERY,
    BrokerAudit,
    ReadGrants,
    audited_config,
    broker_status,
    covers,
)
from shared.security.creds import TEMPLATE
from shared.security.pki import subject_username
from shared.topics import ACTIVATIONS, REPLIES, REQUESTS, ROOT

REFUSALS = [
    "1796684276: Denied PUBLISH from w1 (d0, q1, r0, m1, 'edgesplit/t7/services/w1/status', ... (36 bytes))",
    "1796684393: Sending CONNACK to 127.0.0.1 (0, 135)",
    "1796684124: Sending CONNACK to auto-82B33C1A (0, 5)",
    "1796684132: OpenSSL Error[0]: error:0A00010B:SSL routines::wrong version number",
    "1796684411: Client connection from 127.0.0.1 failed: error:0A000086:SSL routines::certificate verify failed.",
    "1796684543: Client client already connected, closing old connection.",
]
NOISE = [
    "1796684392: New connection from 127.0.0.1:55138 on port 57833.",
    "1796684392: New client connected from 127.0.0.1:36329 as w1 (p5, c1, k60, u'w1').",
    "1796684392: No will message specified.",
    "1796684392: Sending CONNACK to w1 (0, 0)",
    "1796684392: Received PUBLISH from w1 (d0, q0, r0, m0, 'edgesplit/t7/nodes/w1/telemetry', ... (80 bytes))",
    "1796684392: Sending PUBLISH to monitor (d0, q0, r0, m0, 'edgesplit/t7/nodes/w1/telemetry', ... (80 bytes))",
    "1796684396: \tedgesplit/t7/nodes/w1/status (QoS 1)",
    "1796684396: w1 1 edgesplit/t7/nodes/w1/status",
    "1796684393: Client <unknown> disconnected, not authorised.",
    "1796684393: Client <unknown> disconnected: Protocol error.",
    "1796684393: OpenSSL Error[1]: error:0A000412:SSL routines::sslv3 alert bad certificate",
]
KEPT = ["1796684124: mosquitto version 2.0.11 running", "1796684124: Error: Out of memory."]


def test_each_refusal_is_counted_once_and_noise_is_dropped() -> None:
    audit = BrokerAudit()
    kept = [audit.feed(line + "\n") for line in [*REFUSALS, *NOISE, *KEPT]]
    assert audit.snapshot() == {"Connect_refused": 2, "Publish_denied": 1, "Session_takenover": 1, "Tls_refused": 2}
    assert audit.denied_by == {"w1": 1}
    first_of_each_kind = [REFUSALS[0], REFUSALS[1], REFUSALS[3], REFUSALS[5]]
    assert [k.rstrip("\n") for k in kept if k is not None] == [*first_of_each_kind, *KEPT]


def test_a_flood_keeps_the_first_line_and_every_hundredth() -> None:
    audit, line = BrokerAudit(), REFUSALS[0]
    kept = sum(audit.feed(line) is not None for _ in range(3 * KEEP_EVERY))
    assert audit.snapshot() == {"Publish_denied": 3 * KEEP_EVERY} and kept == 1 + 3


def test_follow_reads_a_stream_to_its_end_and_keeps_what_matters() -> None:
    audit, kept = BrokerAudit(), list[bytes]()
    stream = io.BytesIO("\n".join([*NOISE, *REFUSALS, *KEPT]).encode() + b"\n")
    audit.follow(stream, kept.append).join(5)
    assert audit.snapshot()["Tls_refused"] == 2 and len(kept) == 4 + len(KEPT)


def test_the_readiness_probe_is_not_an_attack() -> None:
    audit = BrokerAudit()
    audit.feed(REFUSALS[2])
    audit.forget_readiness_probe(timeout_s=0.1)
    assert audit.snapshot() == {}
    audit.feed(REFUSALS[1])
    assert broker_status(audit.snapshot(), at_s=1.0).refused == {"Connect_refused": 1}


def test_the_audited_config_logs_everything_and_a_changed_template_is_an_error() -> None:
    rendered = TEMPLATE.read_text()
    audited = audited_config(rendered)
    assert "log_type all\n" in audited and "connection_messages true\n" in audited
    assert "log_type error" not in audited and "connection_messages false" not in audited
    with pytest.raises(ValueError, match="log_type"):
        audited_config(rendered.replace("log_type warning\n", ""))


def test_covers_is_mqtt_filter_inclusion() -> None:
    assert covers("e/c/#", "e/c") and covers("e/c/#", "e/c/nodes/+/status") and covers("e/#", "e/#")
    assert covers("e/c/nodes/+/status", "e/c/nodes/w1/status") and covers("e/+/x", "e/+/x")
    assert not covers("e/c/nodes/w1/status", "e/c/nodes/+/status")  # the wildcard reaches others'
    assert not covers("e/c/nodes/+/status", "e/c/nodes/#") and not covers("e/c/x", "e/c/x/y")
    assert not covers("e/c/x/y", "e/c/x") and not covers("e/c/+", "e/c/#")


def test_a_subscription_beyond_the_identitys_read_grants_is_counted() -> None:
    """Mosquitto accepts it and delivers only what the ACL allows; the audit compares the
    subscription it logs with the identity's grants (the same rules as the ACL file)."""
    identities = [Identity("w1", Role.WORKER, 2), Identity("mallory", Role.CLIENT), Identity("operator", Role.OPERATOR)]
    audit = BrokerAudit(ReadGrants.of(identities, "c1"))
    own = [f"w1 1 {REQUESTS.topic('c1', node='w1')}", f"operator 0 {ROOT}/c1/#",
           f"{subject_username('w1')} 0 {ACTIVATIONS.topic('c1', node='w1')}",
           f"mallory 1 {REPLIES.topic('c1', client='mallory')}", f"stranger 0 {ROOT}/c1/#"]  # fmt: skip
    assert all(audit.feed(f"1796684396: {line}") is None for line in own)  # allowed, or not an identity
    beyond = [f"mallory 1 {REQUESTS.filter('c1')}", f"mallory 1 {REPLIES.topic('c1', client='alice')}",
              f"w1 1 {ROOT}/c1/#", f"{subject_username('w1')} 0 {ACTIVATIONS.topic('c1', node='w2')}"]  # fmt: skip
    kept = [audit.feed(f"1796684396: {line}") for line in beyond]
    assert audit.snapshot() == {"Subscribe_denied": 4} and kept[0] is not None
    assert audit.denied_by == {"mallory": 2, "w1": 1, subject_username("w1"): 1}
