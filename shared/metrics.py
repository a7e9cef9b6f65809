"""Prometheus metrics of one process (prometheus-client), served on /metrics.

Every series is declared here, once: the ones a service feeds as things happen
(histograms of time to first token and per output token, tokens, requests by outcome,
re-plans by trigger and kind, stall per re-plan, rollouts, plan proposals) are
prometheus-client objects on the process's own registry; the ones read from the
counters and state a service already keeps (dropped, duplicate and refused messages,
node utilisation and KV bytes, link bandwidth and latency, bytes of weights and KV
moved) are `Reading`s that its readers return at scrape time. A scrape arrives on the
exporter's HTTP thread; the readers run on the service's event loop (they read loop
state), with a deadline, so no lock is needed and nothing computes on the loop but the
reading itself.

Each process serves its registry on ``metrics_host:metrics_port`` (BusSettings; None:
off). `edgesplit up` gives every process a free port and records them in
RUN/metrics-targets.json (a Prometheus file_sd file, deploy/prometheus/prometheus.yml).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.config import BusSettings
from shared.errors import ConfigError
from shared.messages import CapacityProfile

log = logging.getLogger(__name__)
disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``_created`` series: Prometheus does not need them

READ_TIMEOUT_S = 2.0
"""How long a scrape waits for the service's event loop to read its state."""

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Kind = Literal["counter", "gauge"]

READ_SERIES: dict[str, tuple[Kind, str, tuple[str, ...]]] = {
    "edgesplit_messages": (
        "counter", "Messages or frames this process dropped, found duplicate or refused, since it started",
        ("disposition",)),
    "edgesplit_message_reasons": (
        "counter", "edgesplit_messages by the counter that counted them (a bus queue, a check)",
        ("disposition", "reason")),
    "edgesplit_node_utilisation": ("gauge", "CPU utilisation of a node, 0-1", ("node",)),
    "edgesplit_node_compute_busy": ("gauge", "Share of time a node's compute thread was busy, 0-1", ("node",)),
    "edgesplit_node_kv_cache_bytes": ("gauge", "KV cache bytes a node holds", ("node",)),
    "edgesplit_node_blocks": ("gauge", "Blocks a node serves in the committed plan", ("node",)),
    "edgesplit_node_up": ("gauge", "1 when the monitor sees the node up, else 0", ("node",)),
    "edgesplit_link_bandwidth_bytes_per_second": (
        "gauge", "Measured bandwidth of a directed link", ("src", "dst")),
    "edgesplit_link_latency_seconds": ("gauge", "Measured one-way latency of a directed link (rtt / 2)",
                                       ("src", "dst")),
    "edgesplit_weights_moved_bytes": ("counter", "Bytes of block weights a node loaded into memory", ("node",)),
    "edgesplit_kv_moved_bytes": ("counter", "Bytes of KV cache a node received in handoffs", ("node",)),
    "edgesplit_plan_epoch": ("gauge", "Epoch of the committed plan this process knows", ()),
}  # fmt: skip
"""The series read at scrape time: name -> (kind, help, label names)."""


@dataclass(frozen=True)
class Reading:
    """One sample of a `READ_SERIES` series: ``labels`` in the order of its label names."""

    name: str
    value: float
    labels: tuple[str, ...] = ()


Reader = Callable[[], Iterable[Reading]]


EventSeries = Literal["latency", "tokens", "requests", "replans", "replan_stall", "rollouts", "proposals"]


class ServiceMetrics:
    """The series of one process. ``fed``: the event series it feeds (the others exist,
    count nothing and are not exported): ``latency`` (time to first token, time per output
    token), ``tokens``, ``requests``, ``replans``, ``replan_stall``, ``rollouts``,
    ``proposals``. Feed them directly (thread-safe); add readers for the rest.
    Constructor does no I/O."""

    def __init__(self, service: str, fed: Iterable[EventSeries] = ()) -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=True)
        self.time_to_first_token_s = Histogram(
            "edgesplit_time_to_first_token_seconds", "Time from a request to its first token",
            buckets=LATENCY_BUCKETS_S, registry=None)  # fmt: skip
        self.time_per_output_token_s = Histogram(
            "edgesplit_time_per_output_token_seconds", "Time between consecutive output tokens",
            buckets=LATENCY_BUCKETS_S, registry=None)  # fmt: skip
        self.tokens = Counter("edgesplit_tokens_generated", "Output tokens delivered", registry=None)
        self.requests = Counter("edgesplit_requests", "Requests by kind (generate, embed) and outcome "
                                "(ok, cancelled, or OpenAI's error code)", ["kind", "outcome"], registry=None)  # fmt: skip
        self.replans = Counter("edgesplit_replans", "Re-plans decided, by trigger and kind (migrate, resplit)",
                               ["trigger", "kind"], registry=None)  # fmt: skip
        self.replan_stall_s = Histogram(
            "edgesplit_replan_stall_seconds",
            "Stall of a re-plan: prepare (PREPARE to COMMIT, broadcaster) or kv_handoff (a request's "
            "wait at the token boundary, entry worker)", ["phase"], buckets=LATENCY_BUCKETS_S,
            registry=None)  # fmt: skip
        self.rollouts = Counter("edgesplit_rollouts", "Epoch roll-outs by outcome", ["outcome"], registry=None)
        self.proposals = Counter("edgesplit_plan_proposals", "Plans the split reviser answered, by outcome",
                                 ["outcome"], registry=None)  # fmt: skip
        groups: dict[EventSeries, tuple[Collector, ...]] = {
            "latency": (self.time_to_first_token_s, self.time_per_output_token_s), "tokens": (self.tokens,),
            "requests": (self.requests,), "replans": (self.replans,), "replan_stall": (self.replan_stall_s,),
            "rollouts": (self.rollouts,), "proposals": (self.proposals,),
        }  # fmt: skip
        for name in dict.fromkeys(fed):
            for collector in groups[name]:
                self.registry.register(collector)
        self._readers: list[Reader] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.registry.register(_ReadCollector(self))

    def add_reader(self, reader: Reader) -> None:
        self._readers.append(reader)

    def read(self) -> list[Reading]:
        """Every reader's readings now (on the thread that owns the readers' state)."""
        readings: list[Reading] = []
        for reader in self._readers:
            try:
                readings.extend(reader())
            except Exception as error:  # noqa: BLE001 - one bad reader never breaks a scrape
                log.warning("%s: a metrics reader failed: %s", self.service, error)
        return readings

    def read_from_loop(self) -> list[Reading]:
        """`read` on the service's event loop, from the exporter's thread; none when the
        loop is gone or busier than READ_TIMEOUT_S."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return self.read()
        try:
            return asyncio.run_coroutine_threadsafe(_call(self.read), loop).result(timeout=READ_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - a scrape answers what it can
            log.warning("%s: metrics not read: %s", self.service, error)
            return []

    @asynccontextmanager
    async def served(self, settings: BusSettings) -> AsyncIterator[tuple[str, int] | None]:
        """/metrics on ``settings.metrics_host:metrics_port`` while inside (nothing when the
        port is None); yields the bound address. Raises ConfigError when it cannot bind."""
        self._loop = asyncio.get_running_loop()
        if settings.metrics_port is None:
            yield None
            return
        try:
            server, thread = start_http_server(settings.metrics_port, settings.metrics_host, self.registry)
        except OSError as error:
            raise ConfigError(f"{self.service}: metrics cannot listen on {settings.metrics_host}:"
                              f"{settings.metrics_port}: {error.strerror or error}") from None  # fmt: skip
        address = server.server_address
        host, port = str(address[0]), int(address[1])
        log.info("%s: Prometheus metrics at http://%s:%d/metrics", self.service, host, port)
        try:
            yield host, port
        finally:
            server.shutdown()
            server.server_close()
            await asyncio.to_thread(thread.join, 2.0)


async def _call(function: Callable[[], list[Reading]]) -> list[Reading]:
    return function()


class _ReadCollector(Collector):
    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # series come and go with the readings

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.metrics.read_from_loop()))


def families(readings: Iterable[Reading]) -> list[Metric]:
    """`READ_SERIES` families holding ``readings`` (unknown names and label counts that do
    not fit are skipped, logged); a series with no reading is left out."""
    built: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for reading in readings:
        spec = READ_SERIES.get(reading.name)
        if spec is None or len(reading.labels) != len(spec[2]):
            log.warning("metrics reading %s%s does not fit READ_SERIES", reading.name, reading.labels)
            continue
        kind, help_text, labels = spec
        family = built.get(reading.name)
        if family is None:
            maker = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = built[reading.name] = maker(reading.name, help_text, labels=list(labels))
        family.add_metric(list(reading.labels), reading.value)
    return list(built.values())


DISPOSITIONS = ("dropped", "duplicate", "refused")


def message_readings(bus_counters: Mapping[str, int], refusals: Mapping[str, int] | None = None,
                     counters: Mapping[str, int] | None = None) -> list[Reading]:  # fmt: skip
    """``edgesplit_messages`` (always one per disposition, 0 included) and
    ``edgesplit_message_reasons`` from a bus's counters (overflow:* and unroutable dropped,
    malformed:* refused), signature refusals (``{Kind}_{why}``, refused) and a service's
    own counters (see `disposition_of`)."""
    counted: list[tuple[str, str, int]] = []
    for key, count in sorted(bus_counters.items()):
        counted.append(("refused" if key.startswith("malformed:") else "dropped", key, count))
    counted += [("refused", key, count) for key, count in sorted((refusals or {}).items())]
    for key, count in sorted((counters or {}).items()):
        meaning = disposition_of(key)
        if meaning is not None:
            counted.append((meaning, key, count))
    totals = dict.fromkeys(DISPOSITIONS, 0)
    for kind, _key, count in counted:
        totals[kind] += count
    return [*(Reading("edgesplit_messages", float(total), (name,)) for name, total in totals.items()),
            *(Reading("edgesplit_message_reasons", float(count), (kind, key)) for kind, key, count in counted)]


def disposition_of(counter: str) -> Literal["dropped", "duplicate", "refused"] | None:
    """What a worker counter means for ``edgesplit_messages`` (None: not a message count)."""
    if counter.endswith("_duplicate") or counter == "results_unexpected":
        return "duplicate"
    if counter.startswith("refused_") or counter.endswith(("_refused", "_forged")) or counter == "stale_plans":
        return "refused"
    if counter in ("frames_fenced", "frames_unsent", "frames_withheld_privacy", "frames_failed"):
        return "dropped"
    return None


def profile_readings(profile: CapacityProfile | None) -> list[Reading]:
    """Per-node utilisation, compute busy (queue), KV bytes and health, and per-link
    bandwidth and latency, from the monitor's capacity profile (none before the first)."""
    if profile is None:
        return []
    readings = []
    for node in sorted(profile.nodes, key=lambda n: n.node):
        labels: tuple[str, ...] = (str(node.node),)
        readings += [
            Reading("edgesplit_node_utilisation", node.cpu_utilisation, labels),
            Reading("edgesplit_node_kv_cache_bytes", float(node.kv_cache_bytes), labels),
            Reading("edgesplit_node_up", 1.0 if node.alive and node.health != "down" else 0.0, labels),
        ]
        if node.blocks_held is not None:
            readings.append(Reading("edgesplit_node_blocks", float(node.blocks_held), labels))
    for link in sorted(profile.links, key=lambda each: (each.src, each.dst)):
        labels = (str(link.src), str(link.dst))
        readings += [
            Reading("edgesplit_link_bandwidth_bytes_per_second", link.bandwidth_bytes_per_s, labels),
            Reading("edgesplit_link_latency_seconds", link.latency_s, labels),
        ]
    return readings
