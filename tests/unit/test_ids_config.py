"""Ids, topics and settings: validation, broker URLs, env prefix, CLI precedence."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from shared.config import BusSettings, load_settings, parse_broker_url
from shared.errors import ConfigError, InvalidId
from shared.ids import new_request_id, node_id, validate_id
from shared.messages import CommitEpoch, NodeStatus
from shared.tensor_frame import Frame
from shared.topics import ACTIVATIONS, EPOCH_ACKS, NODE_STATUS, PLAN, Topic, match


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "+", "a b", "é", "x" * 65, None, 5])
def test_ids_reject_topic_breaking_values(bad: object) -> None:
    with pytest.raises(InvalidId):
        validate_id(bad)  # type: ignore[arg-type]


def test_ids_accept_the_allowed_alphabet() -> None:
    assert node_id("car-1_A") == "car-1_A"
    assert validate_id("x" * 64) == "x" * 64
    assert validate_id(new_request_id())


def test_topics_build_filter_and_parse() -> None:
    name = NODE_STATUS.topic("c1", node="w1")
    assert name == "edgesplit/c1/nodes/w1/status"
    assert NODE_STATUS.filter("c1") == "edgesplit/c1/nodes/+/status"
    assert PLAN.topic("c1") == "edgesplit/c1/plan/current"
    assert NODE_STATUS.parse(name) == ("c1", {"node": "w1"})
    assert match(name) == (NODE_STATUS, "c1", {"node": "w1"})
    assert match("edgesplit/c1/nodes/w1/activations") == (ACTIVATIONS, "c1", {"node": "w1"})
    assert match("edgesplit/c1/nowhere") is None
    assert match("other/c1/plan/current") is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: NODE_STATUS.topic("c1", node="w/1"),
        lambda: NODE_STATUS.topic("c1", node="+"),
        lambda: NODE_STATUS.topic("c1"),
        lambda: NODE_STATUS.topic("c1", node="w1", extra="x"),
        lambda: NODE_STATUS.topic("c#", node="w1"),
        lambda: NODE_STATUS.filter("c1", nod="w1"),
        lambda: EPOCH_ACKS.filter("c1", node="#"),
    ],
)
def test_topics_validate_parameters(call: object) -> None:
    with pytest.raises(InvalidId):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    "declare",
    [
        lambda: Topic("nodes/{peer}/status", NodeStatus),  # overlaps NODE_STATUS
        lambda: Topic("x/{a}", NodeStatus, qos=2),  # type: ignore[arg-type]
        lambda: Topic("x/{a}/{a}", NodeStatus),
        lambda: Topic("x/{cluster}", NodeStatus),
        lambda: Topic("x/#", NodeStatus),
        lambda: Topic("x/frames", Frame),  # frames need the data plane
        lambda: Topic("x/cmd", CommitEpoch, plane="data"),
        lambda: Topic("x/{a}/frames1", Frame, plane="data", qos=1),  # data is QoS 0
        lambda: Topic("x/{a}/frames2", Frame, plane="data", retain=True),
    ],
)
def test_bad_topic_declarations_fail_at_import(declare: object) -> None:
    with pytest.raises(ValueError):
        declare()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1883", ("mqtt", "127.0.0.1", 1883, None, None, False)),
        ("mqtt://broker", ("mqtt", "broker", 1883, None, None, False)),
        ("mqtts://broker.example", ("mqtts", "broker.example", 8883, None, None, True)),
        ("mqtt://u%40x:p%3Aw@h:1999", ("mqtt", "h", 1999, "u@x", "p:w", False)),
        ("mqtt://[::1]:1884", ("mqtt", "::1", 1884, None, None, False)),
    ],
)
def test_broker_urls_parse(url: str, expected: tuple[object, ...]) -> None:
    address = parse_broker_url(url)
    got = (
        address.scheme,
        address.host,
        address.port,
        address.username,
        address.password,
        address.tls,
    )
    assert got == expected
    assert "p:w" not in repr(address) and "p:w" not in address.redacted()


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1",
        "mqtt://",
        "mqtt://h:99999",
        "mqtt://h:x",
        "h:1883",
        "mqtt://h:1/x",
        "mqtt://h:0",
    ],
)
def test_bad_broker_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="broker URL"):
        parse_broker_url(url)


def test_settings_defaults() -> None:
    settings = BusSettings()
    assert settings.broker_url == "mqtt://127.0.0.1:1883"
    assert settings.cluster == "default" and settings.keepalive_s == 2
    assert settings.plan_signing_key is None  # no default key (shared/security/signing.py)
    assert settings.models_dir == Path.home() / ".cache" / "edgesplit" / "models"


def test_env_prefix_and_cli_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESPLIT_BROKER_URL", "mqtt://env-host:1884")
    monkeypatch.setenv("EDGESPLIT_CLUSTER", "from-env")
    monkeypatch.setenv("BROKER_URL", "mqtt://unprefixed:1")
    settings = load_settings(BusSettings, {"cluster": "from-cli", "keepalive_s": None})
    assert settings.broker.host == "env-host" and settings.broker.port == 1884
    assert settings.cluster == "from-cli" and settings.keepalive_s == 2
    with pytest.raises(pydantic.ValidationError):  # frozen
        settings.cluster = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides",
    [
        {"broker_url": "tcp://h:1"},
        {"cluster": "a/b"},
        {"client_id": "x+"},
        {"protocol": "4"},
        {"keepalive_s": 0},
        {"reconnect_initial_s": 2.0, "reconnect_max_s": 1.0},
        {"no_such_setting": 1},
    ],
)
def test_invalid_settings_are_one_line_config_errors(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(BusSettings, overrides)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_durations_that_are_not_finite_are_config_errors(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("EDGESPLIT_CONNECT_TIMEOUT_S", value)
    with pytest.raises(ConfigError, match="connect_timeout_s: Input should be a finite number"):
        load_settings(BusSettings)
    monkeypatch.delenv("EDGESPLIT_CONNECT_TIMEOUT_S")
    with pytest.raises(ConfigError, match="publish_timeout_s: Input should be a finite number"):
        load_settings(BusSettings, {"publish_timeout_s": float(value)})


def test_invalid_env_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESPLIT_BROKER_URL", "mqtt://h:notaport")
    with pytest.raises(ConfigError, match="broker_url"):
        load_settings(BusSettings)


def test_topic_lookups_are_cached_but_never_shared_or_unvalidated() -> None:
    from shared import topics

    name = NODE_STATUS.topic("c1", node="w1")
    assert NODE_STATUS.topic("c1", node="w1") is name  # rendered once
    first, second = topics.match(name), topics.match(name)
    assert first is not None and second is not None
    assert first == second == (NODE_STATUS, "c1", {"node": "w1"})
    first[2]["node"] = "changed"  # a caller's copy: the cache is not affected
    assert topics.match(name) == (NODE_STATUS, "c1", {"node": "w1"})
    assert topics.match("edgesplit/c1/nowhere/x") is None
    assert topics.match("edgesplit/c1/nowhere/x") is None  # cached miss
    with pytest.raises(InvalidId):
        NODE_STATUS.topic("c1", node=["w1"])  # type: ignore[arg-type]
    with pytest.raises(InvalidId):
        NODE_STATUS.topic("c1", node="bad/id")
    with pytest.raises(InvalidId):
        NODE_STATUS.topic("c1", node="bad/id")  # still refused: failures are not cached
