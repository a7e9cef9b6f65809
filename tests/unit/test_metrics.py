"""shared/metrics.py: the read series, the message counts, the profile's series, and a
real /metrics endpoint scraped over HTTP while the service's loop owns the state."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared.config import BusSettings
from shared.errors import ConfigError
from shared.messages import CapacityProfile, LinkCapacity, NodeCapacity
from shared.metrics import (
    Reading,
    ServiceMetrics,
    disposition_of,
    message_readings,
    profile_readings,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """name and sorted labels -> value, of every sample in an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_message_readings_sum_each_disposition_and_keep_the_reasons() -> None:
    readings = message_readings({"overflow:nodes/+/requests": 3, "malformed:plan/current": 1, "unroutable": 2},
                                {"Plan_bad_signature": 4},
                                {"frames_duplicate": 5, "requests_duplicate": 1, "frames_refused": 7,
                                 "frames_fenced": 2, "kv_blocks_received": 9})  # fmt: skip
    totals = {r.labels[0]: r.value for r in readings if r.name == "edgesplit_messages"}
    assert totals == {"dropped": 3 + 2 + 2, "duplicate": 5 + 1, "refused": 1 + 4 + 7}
    reasons = {r.labels: r.value for r in readings if r.name == "edgesplit_message_reasons"}
    assert reasons[("refused", "Plan_bad_signature")] == 4
    assert ("dropped", "frames_fenced") in reasons and not any(key == "kv_blocks_received" for _, key in reasons)


def test_message_readings_report_zeros_when_nothing_was_counted() -> None:
    totals = {r.labels[0]: r.value for r in message_readings({}) if r.name == "edgesplit_messages"}
    assert totals == {"dropped": 0.0, "duplicate": 0.0, "refused": 0.0}


@pytest.mark.parametrize(("counter", "meaning"), [
    ("frames_duplicate", "duplicate"), ("results_unexpected", "duplicate"), ("refused_busy", "refused"),
    ("frames_forged", "refused"), ("plans_refused", "refused"), ("frames_unsent", "dropped"),
    ("kv_missing", None), ("retries", None)])  # fmt: skip
def test_disposition_of_worker_counters(counter: str, meaning: str | None) -> None:
    assert disposition_of(counter) == meaning


def test_profile_readings_give_nodes_and_links() -> None:
    profile = CapacityProfile(as_of_s=1.0, nodes=(
        NodeCapacity(node="car", alive=True, trust=2, memory_free_bytes=1, flops_per_s=1.0, utilisation=0.5,
                     cpu_utilisation=0.25, kv_cache_bytes=4096, blocks_held=3),
        NodeCapacity(node="mec", alive=False, trust=0, memory_free_bytes=1, flops_per_s=1.0, utilisation=0.0,
                     health="down"),
    ), links=(LinkCapacity(src="car", dst="mec", bandwidth_bytes_per_s=1.5e6, latency_s=0.004),))  # fmt: skip
    got = {(r.name, r.labels): r.value for r in profile_readings(profile)}
    assert got[("edgesplit_node_utilisation", ("car",))] == 0.25
    assert got[("edgesplit_node_kv_cache_bytes", ("car",))] == 4096
    assert got[("edgesplit_node_blocks", ("car",))] == 3 and ("edgesplit_node_blocks", ("mec",)) not in got
    assert got[("edgesplit_node_up", ("car",))] == 1 and got[("edgesplit_node_up", ("mec",))] == 0
    assert got[("edgesplit_link_bandwidth_bytes_per_second", ("car", "mec"))] == 1.5e6
    assert got[("edgesplit_link_latency_seconds", ("car", "mec"))] == 0.004
    assert profile_readings(None) == []


def test_only_the_fed_event_series_are_exported() -> None:
    metrics = ServiceMetrics("test", ("replans",))
    metrics.replans.labels("link_degraded", "migrate").inc()
    metrics.tokens.inc()  # not fed: counts, but is not exported
    text = generate_latest(metrics.registry).decode()
    got = samples(text)
    assert got[("edgesplit_replans_total", (("kind", "migrate"), ("trigger", "link_degraded")))] == 1
    assert not any(name.startswith("edgesplit_tokens") for name, _ in got)


def test_a_reading_that_does_not_fit_its_series_is_skipped() -> None:
    metrics = ServiceMetrics("test")
    metrics.add_reader(lambda: [Reading("edgesplit_node_utilisation", 0.5, ("a", "b")),
                                Reading("no_such_series", 1.0), Reading("edgesplit_plan_epoch", 7.0)])  # fmt: skip
    got = samples(generate_latest(metrics.registry).decode())
    assert got == {("edgesplit_plan_epoch", ()): 7.0}


def test_a_reader_that_raises_leaves_the_others() -> None:
    def broken() -> list[Reading]:
        raise RuntimeError("boom")

    metrics = ServiceMetrics("test")
    metrics.add_reader(broken)
    metrics.add_reader(lambda: [Reading("edgesplit_plan_epoch", 3.0)])
    assert samples(generate_latest(metrics.registry).decode()) == {("edgesplit_plan_epoch", ()): 3.0}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:  # noqa: S310
        return str(answer.read().decode())


def test_metrics_are_served_and_read_on_the_services_loop() -> None:
    async def main() -> None:
        state = {"epoch": 1}
        seen_threads: list[bool] = []
        metrics = ServiceMetrics("test", ("tokens",))

        def reader() -> list[Reading]:
            seen_threads.append(asyncio.get_running_loop() is loop)  # raises off the loop
            return [Reading("edgesplit_plan_epoch", float(state["epoch"]))]

        loop = asyncio.get_running_loop()
        metrics.add_reader(reader)
        settings = BusSettings(metrics_port=0)
        async with metrics.served(settings) as address:
            assert address is not None
            first = samples(await asyncio.to_thread(_scrape, address[1]))
            state["epoch"] = 5
            metrics.tokens.inc(3)
            second = samples(await asyncio.to_thread(_scrape, address[1]))
        assert first[("edgesplit_plan_epoch", ())] == 1 and first[("edgesplit_tokens_generated_total", ())] == 0
        assert second[("edgesplit_plan_epoch", ())] == 5 and second[("edgesplit_tokens_generated_total", ())] == 3
        assert seen_threads == [True, True]
        with pytest.raises(OSError):
            await asyncio.to_thread(_scrape, address[1])  # closed on exit

    asyncio.run(asyncio.wait_for(main(), 30))


def test_no_port_serves_nothing_and_a_taken_port_is_a_config_error() -> None:
    async def main() -> None:
        metrics = ServiceMetrics("test")
        async with metrics.served(BusSettings()) as address:
            assert address is None
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError, match=f"metrics cannot listen on 127.0.0.1:{port}"):
                async with metrics.served(BusSettings(metrics_port=port)):
                    pass

    asyncio.run(asyncio.wait_for(main(), 30))
