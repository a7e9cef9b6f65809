"""`edgesplit health` (a container's health check) against a real broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.cli import main
from services.cli.health import Target, target_from, verdict
from shared.broker import LocalBroker, free_port
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import NodeStatus, ServiceStatus
from shared.security import pki
from shared.security.reporting import report_refusals
from shared.topics import NODE_STATUS, SERVICE_STATUS


@pytest.fixture(autouse=True)
def _no_target_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EDGESPLIT_NODE_ID", "EDGESPLIT_CLIENT_ID", "EDGESPLIT_BROKER_URL", "EDGESPLIT_CLUSTER"):
        monkeypatch.delenv(name, raising=False)


def _node(state: str) -> NodeStatus:
    return NodeStatus(node="car", state=state, trust=8, memory_bytes=10**9, threads=1)  # type: ignore[arg-type]


async def _retain(broker: LocalBroker, cluster: str, *messages: NodeStatus | ServiceStatus) -> None:
    async with Bus(BusSettings(broker_url=broker.url, cluster=cluster)) as bus:
        await bus.wait_ready()
        for message in messages:
            if isinstance(message, NodeStatus):
                await bus.publish(NODE_STATUS, message, node=message.node)
            else:
                await bus.publish(SERVICE_STATUS, message, service=message.service)


def _health(broker: LocalBroker, cluster: str, *args: str) -> int:
    return main(["health", "--broker", broker.url, "--cluster", cluster, "--wait-s", "1", *args])


def test_fresh_service_and_online_node_are_healthy_stale_offline_and_absent_are_not(
    broker: LocalBroker, cluster: str, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    asyncio.run(_retain(broker, cluster, _node("online"),
                        ServiceStatus(service="orchestrator", at_s=now),
                        ServiceStatus(service="monitor", at_s=now - 120)))  # fmt: skip
    assert _health(broker, cluster, "--service", "orchestrator") == 0
    assert _health(broker, cluster, "--node", "car") == 0
    capsys.readouterr()
    assert _health(broker, cluster, "--service", "monitor") == 1
    assert "monitor: last status 1" in capsys.readouterr().err
    assert _health(broker, cluster, "--service", "broadcaster") == 1
    assert "no retained status" in capsys.readouterr().err
    asyncio.run(_retain(broker, cluster, _node("offline")))  # what the Last Will says
    assert _health(broker, cluster, "--node", "car") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "node car: offline" in err


def test_the_target_comes_from_the_environment_a_container_sets(
    broker: LocalBroker, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(_retain(broker, cluster, ServiceStatus(service="broadcaster", at_s=time.time())))
    monkeypatch.setenv("EDGESPLIT_CLIENT_ID", "broadcaster")
    monkeypatch.setenv("EDGESPLIT_BROKER_URL", broker.url)
    monkeypatch.setenv("EDGESPLIT_CLUSTER", cluster)
    assert main(["health", "--wait-s", "1"]) == 0
    monkeypatch.setenv("EDGESPLIT_NODE_ID", "rsu")  # a worker's: checked as a node
    assert main(["health", "--wait-s", "1"]) == 1


def test_a_service_heartbeat_keeps_its_status_fresh(broker: LocalBroker, cluster: str) -> None:
    """report_refusals republishes an unchanged status every heartbeat_s."""

    async def scenario() -> list[float]:
        settings = BusSettings(broker_url=broker.url, cluster=cluster)
        async with Bus(settings) as bus, bus.subscribe(SERVICE_STATUS, service="reviser") as statuses:
            await bus.wait_ready()
            reporter = asyncio.ensure_future(report_refusals(bus, "reviser", dict, period_s=0.05, heartbeat_s=0.2))
            try:
                async with asyncio.timeout(5):
                    return [(await statuses.get()).message.at_s for _ in range(3)]
            finally:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)

    stamps = asyncio.run(scenario())
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 0.3


def test_bad_arguments_are_one_line_and_exit_2(
    broker: LocalBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--broker", broker.url]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["health", "--broker", broker.url, "--service", "a/b"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:
        main(["health", "--max-age-s", "nan"])
    assert exited.value.code == 2


def test_no_broker_is_unhealthy_not_a_crash(capsys: pytest.CaptureFixture[str]) -> None:
    from shared.broker import free_port

    code = main(["health", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--service", "monitor",
                 "--wait-s", "0.5"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("edgesplit: unhealthy: service monitor:") and err.count("\n") == 1


def test_verdict_and_target_rules() -> None:
    node, service = Target("node", "car"), Target("service", "monitor")
    assert verdict(node, None, 0.0, 30.0)[0] is False
    assert verdict(service, ServiceStatus(service="monitor", at_s=100.0), 129.0, 30.0)[0] is True
    assert verdict(service, ServiceStatus(service="monitor", at_s=100.0), 131.0, 30.0)[0] is False
    assert target_from(None, None, {}) is None
    assert target_from(None, None, {"EDGESPLIT_CLIENT_ID": "monitor"}) == service
    assert target_from(None, None, {"EDGESPLIT_CLIENT_ID": "x", "EDGESPLIT_NODE_ID": "car"}) == node
    assert target_from("monitor", None, {"EDGESPLIT_NODE_ID": "car"}) == service


def test_the_checked_processs_own_certificate_is_refused_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the secure profile the broker makes a certificate's identity the client id: a
    check with the orchestrator's certificate would take the orchestrator's session. It is
    refused before connecting (exit 2, one line); another identity's certificate is not."""
    ca = pki.create_ca(tmp_path / "ca")
    for name in ("orchestrator", "health-orchestrator"):
        pki.issue(ca, tmp_path / "certs", name)
    own = ["--tls-cert", str(tmp_path / "certs/orchestrator.crt"), "--tls-key", str(tmp_path / "certs/orchestrator.key")]
    broker = f"mqtts://127.0.0.1:{free_port()}"  # nothing listens: only a refusal can be quick and exit 2
    assert main(["health", "--broker", broker, "--service", "orchestrator", "--wait-s", "1", *own]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "take over that process's session" in err and "Traceback" not in err
    monkeypatch.setenv("EDGESPLIT_CLIENT_ID", "orchestrator")  # a container's own identity, checking another
    assert main(["health", "--broker", broker, "--service", "monitor", "--wait-s", "1", *own]) == 2
    capsys.readouterr()
    other = ["--tls-cert", str(tmp_path / "certs/health-orchestrator.crt"),
             "--tls-key", str(tmp_path / "certs/health-orchestrator.key")]  # fmt: skip
    monkeypatch.delenv("EDGESPLIT_CLIENT_ID")
    assert main(["health", "--broker", broker, "--service", "orchestrator", "--wait-s", "1", *other]) == 1  # unreachable
    assert "take over" not in capsys.readouterr().err
