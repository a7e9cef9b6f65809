"""The monitor's state, pure: node and link records, events, the capacity profile.

Everything here works over snapshots and an explicit clock (``now_s``, Unix seconds,
passed in by the caller), so it runs the same in unit tests and in the service. The
detectors it uses (smoothing windows, persistence with hysteresis, link metrics against
a baseline) are in `services.monitor.detect`.

- Heartbeats: a node that sent neither telemetry nor status for ``heartbeat_timeout_s``
  is down; an offline status (Last Will or clean exit) downs it at once.
- Load: a node is overloaded when its compute-busy share or queue stays at or above its
  threshold for ``persist_s``, cleared when both stay low for ``persist_s``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from services.monitor.detect import Change, MedianWindow, MonitorConfig, Persistence, TrackedMetric
from shared.messages import (
    CapacityProfile,
    Evidence,
    LayerCost,
    LinkCapacity,
    LinkDegraded,
    LinkObservation,
    LinkRecovered,
    Message,
    NodeCapacity,
    NodeDown,
    NodeJoined,
    NodeOverloadCleared,
    NodeOverloaded,
    NodeStatus,
    Telemetry,
)

RTT_AGREE = 3
"""Round trips of one window that must all have risen for the profile to take the rise at
once (two may both be event-loop stalls on a loaded machine)."""


@dataclass
class LinkRecord:
    """What the monitor knows about the directed link src -> dst."""

    src: str
    dst: str
    bandwidth: TrackedMetric
    rtt: TrackedMetric
    loss: TrackedMetric
    passive: MedianWindow
    probe_traffic: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=60))

    def degraded(self) -> tuple[str, ...]:
        metrics = (self.bandwidth, self.rtt, self.loss)
        return tuple(metric.kind for metric in metrics if metric.detector.tripped)

    def planning(self, now_s: float) -> tuple[float | None, float | None]:
        """(bandwidth, rtt) as the profile plans with them."""
        return self.bandwidth.planning_value(now_s), self.rtt.planning_value(now_s)


def worse(before: tuple[float | None, float | None], after: tuple[float | None, float | None],
          config: MonitorConfig) -> bool:  # fmt: skip
    """True when a link's planning (bandwidth, rtt) got clearly worse: bandwidth down by the
    degradation share, or rtt up by its rise and the absolute minimum."""
    (bw0, rtt0), (bw1, rtt1) = before, after
    if bw0 is not None and bw1 is not None and bw1 < bw0 * (1 - config.bandwidth_drop):
        return True
    return (rtt0 is not None and rtt1 is not None
            and rtt1 > max(rtt0 * (1 + config.rtt_rise), rtt0 + config.rtt_min_rise_s))  # fmt: skip


@dataclass
class NodeRecord:
    """What the monitor knows about one node."""

    node: str
    config: MonitorConfig
    up: bool = False
    status: NodeStatus | None = None
    telemetry: Telemetry | None = None
    last_seen_s: float = 0.0
    down_since_s: float = 0.0
    down_reason: str = ""
    busy: MedianWindow = field(init=False)
    queue: MedianWindow = field(init=False)
    decode: MedianWindow = field(init=False)
    prefill: MedianWindow = field(init=False)
    overload: Persistence = field(init=False)

    def __post_init__(self) -> None:
        size, age = self.config.load_window, self.config.max_sample_age_s
        self.busy, self.queue = MedianWindow(size, age), MedianWindow(size, age)
        self.decode, self.prefill = MedianWindow(size, age), MedianWindow(size, age)
        self.overload = Persistence(self.config.persist_s)


class MonitorState:
    """The cluster's capacity profile, built from statuses and telemetry.

    ``links``: the directed node pairs that may exchange activations (None: every
    ordered pair of known nodes). ``layers``: the manifest's block costs (may be empty).
    """

    def __init__(self, config: MonitorConfig, links: Iterable[tuple[str, str]] | None = None,
                 layers: tuple[LayerCost, ...] = (), model_id: str = "",
                 symmetric: Iterable[tuple[str, str]] = ()) -> None:  # fmt: skip
        self.config = config
        self.declared = sorted(set(links)) if links is not None else None
        self.symmetric = {frozenset(pair) for pair in symmetric}
        """Node pairs whose link is one medium both ways (topology ``symmetric``): a fall
        measured one way is planned for the other way too until that way measures anew."""
        self.layers, self.model_id = layers, model_id
        self.nodes: dict[str, NodeRecord] = {}
        self._links: dict[tuple[str, str], LinkRecord] = {}
        self.urgent = False
        """A link's planning values got clearly worse since the last profile: publish now
        (the service resets it when it publishes)."""

    # --- inputs -----------------------------------------------------------------------------

    def on_status(self, status: NodeStatus, now_s: float) -> list[Message]:
        record = self._node(status.node)
        record.status = status
        if status.state == "online":
            record.last_seen_s = max(record.last_seen_s, now_s)
            return self._join(record, "status", now_s)
        if not record.up:
            return []
        evidence = Evidence(metric="status_online", old_value=1.0, new_value=0.0,
                            window_s=max(0.0, now_s - record.last_seen_s))  # fmt: skip
        return [self._down(record, "offline", now_s, evidence)]

    def on_telemetry(self, telemetry: Telemetry, now_s: float) -> list[Message]:
        record = self._node(telemetry.node)
        record.telemetry, record.last_seen_s = telemetry, now_s
        events = self._join(record, "telemetry", now_s)
        record.busy.add(now_s, telemetry.compute_busy)
        record.queue.add(now_s, float(telemetry.queue_depth))
        times = telemetry.block_times
        if times is not None and times.decode_s_per_block is not None:
            record.decode.add(now_s, times.decode_s_per_block)
        if times is not None and times.prefill_s_per_block_token is not None:
            record.prefill.add(now_s, times.prefill_s_per_block_token)
        events += self._check_load(record, now_s)
        for observation in telemetry.links:
            if observation.peer == telemetry.node:
                continue
            outbound = self._link(telemetry.node, observation.peer)
            before = outbound.planning(now_s)
            events += self._observe(outbound, observation, now_s, telemetry.window_s)
            self.urgent = self.urgent or worse(before, outbound.planning(now_s), self.config)
            if observation.inbound_bandwidth_bytes_per_s is not None:
                self._link(observation.peer, telemetry.node).passive.add(
                    now_s, observation.inbound_bandwidth_bytes_per_s)  # fmt: skip
        return events

    def tick(self, now_s: float) -> list[Message]:
        """Heartbeat check: down every up node silent for longer than the timeout."""
        events: list[Message] = []
        for record in self.nodes.values():
            age_s = now_s - record.last_seen_s
            if record.up and age_s > self.config.heartbeat_timeout_s:
                evidence = Evidence(metric="heartbeat_age_s", new_value=age_s,
                                    threshold=self.config.heartbeat_timeout_s, window_s=age_s)  # fmt: skip
                events.append(self._down(record, "heartbeat_timeout", now_s, evidence))
        return events

    def seed(self, profile: CapacityProfile, now_s: float) -> None:
        """Start from a previous monitor's retained profile: its up nodes count as up (no
        NodeJoined again) until their heartbeat times out, its link values as one sample."""
        for node in profile.nodes:
            record = self._node(node.node)
            record.up, record.last_seen_s = node.alive, now_s
            if node.health == "overloaded":
                record.overload.tripped = True
        for link in profile.links:
            record_link = self._link(link.src, link.dst)
            if link.bandwidth_source == "probe" and link.bandwidth_bytes_per_s > 0:
                record_link.bandwidth.window.add(now_s, link.bandwidth_bytes_per_s)
            if link.rtt_s is not None:
                record_link.rtt.window.add(now_s, link.rtt_s)

    # --- transitions ------------------------------------------------------------------------

    def _join(self, record: NodeRecord, reason: Literal["status", "telemetry"], now_s: float) -> list[Message]:
        if record.up:
            return []
        record.up, record.down_reason = True, ""
        downtime_s = now_s - record.down_since_s if record.down_since_s else 0.0
        evidence = Evidence(metric=f"{reason}_seen", old_value=0.0, new_value=1.0, window_s=downtime_s)
        return [NodeJoined(node=record.node, at_s=now_s, reason=reason, evidence=(evidence,))]  # type: ignore[arg-type]

    def _down(self, record: NodeRecord, reason: Literal["offline", "heartbeat_timeout"],
              now_s: float, evidence: Evidence) -> NodeDown:  # fmt: skip
        record.up, record.down_reason, record.down_since_s = False, reason, now_s
        record.overload = Persistence(self.config.persist_s)
        return NodeDown(node=record.node, at_s=now_s, reason=reason, evidence=(evidence,))  # type: ignore[arg-type]

    def _check_load(self, record: NodeRecord, now_s: float) -> list[Message]:
        config = self.config
        busy, queue = record.busy.value(now_s), record.queue.value(now_s)
        if busy is None or queue is None or record.busy.count(now_s) < min(config.min_samples, config.load_window):
            return []
        bad = busy >= config.busy_overloaded or queue >= config.queue_overloaded
        good = busy <= config.busy_cleared and queue <= config.queue_cleared
        started_s = record.overload.pending_since_s
        transition = record.overload.update(now_s, bad, good)
        if transition is None:
            return []
        held_s = now_s - started_s if started_s is not None else 0.0
        samples = record.busy.count(now_s)
        evidence = (
            Evidence(metric="compute_busy", new_value=busy, threshold=config.busy_overloaded
                     if transition == "tripped" else config.busy_cleared, window_s=held_s, samples=samples),
            Evidence(metric="queue_depth", new_value=queue, threshold=config.queue_overloaded
                     if transition == "tripped" else config.queue_cleared, window_s=held_s, samples=samples),
        )  # fmt: skip
        kind = NodeOverloaded if transition == "tripped" else NodeOverloadCleared
        return [kind(node=record.node, at_s=now_s, evidence=evidence)]  # type: ignore[arg-type]

    def _observe(self, link: LinkRecord, observation: LinkObservation, now_s: float,
                 window_s: float) -> list[Message]:  # fmt: skip
        link.probe_traffic.append((now_s, observation.probe_bytes, window_s))
        changes: list[tuple[str, Change | None]] = []
        bandwidth = observation.delivery_bandwidth_bytes_per_s or observation.bandwidth_bytes_per_s
        agreed = observation.bandwidth_high_bytes_per_s if observation.bandwidth_samples >= 2 else None
        if bandwidth is not None:  # the traffic's own delivery rate first, else the probe pair
            changes.append(("bandwidth", link.bandwidth.add(now_s, bandwidth, agreed)))
        if observation.rtt_s is not None:
            low = observation.rtt_low_s if observation.rtt_samples >= RTT_AGREE else None
            changes.append(("rtt", link.rtt.add(now_s, observation.rtt_s, low)))
        if observation.probes_sent or observation.probes_lost:
            sent = max(observation.probes_sent, observation.probes_lost)
            changes.append(("loss", link.loss.add(now_s, observation.probes_lost / sent)))
        events: list[Message] = []
        for metric, change in changes:
            if change is None:
                continue
            kind = LinkDegraded if change.transition == "tripped" else LinkRecovered
            events.append(kind(src=link.src, dst=link.dst, at_s=now_s, metric=metric,  # type: ignore[arg-type]
                               evidence=(change.evidence,)))  # fmt: skip
        return events

    # --- records ----------------------------------------------------------------------------

    def _node(self, node: str) -> NodeRecord:
        if node not in self.nodes:
            self.nodes[node] = NodeRecord(node, self.config)
        return self.nodes[node]

    def _link(self, src: str, dst: str) -> LinkRecord:
        key = (src, dst)
        if key not in self._links:
            config = self.config
            self._links[key] = LinkRecord(
                src, dst, TrackedMetric("bandwidth", config), TrackedMetric("rtt", config),
                TrackedMetric("loss", config), MedianWindow(config.window, config.max_sample_age_s),
            )  # fmt: skip
        return self._links[key]

    def link_keys(self) -> list[tuple[str, str]]:
        if self.declared is not None:
            return list(self.declared)
        names = sorted(self.nodes)
        return [(src, dst) for src in names for dst in names if src != dst]

    # --- the profile ------------------------------------------------------------------------

    def profile(self, now_s: float) -> CapacityProfile:
        """The capacity profile as of ``now_s`` (nodes and links sorted by id)."""
        nodes = tuple(self._node_capacity(self.nodes[name], now_s) for name in sorted(self.nodes))
        links = tuple(self._link_capacity(src, dst, now_s) for src, dst in self.link_keys())
        return CapacityProfile(as_of_s=now_s, nodes=nodes, links=links, model_id=self.model_id[:1024],
                               layers=self.layers, heartbeat_timeout_s=self.config.heartbeat_timeout_s)  # fmt: skip

    def _node_capacity(self, record: NodeRecord, now_s: float) -> NodeCapacity:
        status, telemetry = record.status, record.telemetry
        prefill, decode = record.prefill.value(now_s), record.decode.value(now_s)
        flops = math.fsum(layer.flops_per_token for layer in self.layers) / max(1, len(self.layers))
        per_token = prefill if prefill is not None else decode
        flops_per_s = flops / per_token if flops > 0 and per_token else 0.0
        weights = math.fsum(layer.weight_bytes for layer in self.layers) / max(1, len(self.layers))
        memory_bytes = status.memory_bytes if status else 0
        kv = telemetry.kv_cache_bytes if telemetry else 0
        held = telemetry.blocks_held if telemetry else 0
        free = max(0, int(memory_bytes - kv - held * weights))
        available = telemetry.memory_available_bytes if telemetry else None
        if available is not None:
            free = min(free, available)
        health = "down" if not record.up else ("overloaded" if record.overload.tripped else "up")
        times = telemetry.block_times if telemetry else None
        source = times.source if times else "none"
        return NodeCapacity(
            node=record.node, alive=record.up, trust=status.trust if status else 0,  # type: ignore[arg-type]
            memory_free_bytes=free, flops_per_s=flops_per_s,
            utilisation=min(1.0, max(0.0, record.busy.value(now_s) or 0.0)),
            health=health, down_reason=record.down_reason, memory_bytes=memory_bytes,  # type: ignore[arg-type]
            memory_used_bytes=telemetry.memory_used_bytes if telemetry else 0,
            memory_available_bytes=available,
            cpu_utilisation=telemetry.cpu_utilisation if telemetry else 0.0,
            queue_depth=record.queue.value(now_s) or 0.0,
            requests_in_flight=telemetry.requests_in_flight if telemetry else 0,
            requests_queued=telemetry.requests_queued if telemetry else 0,
            kv_cache_bytes=kv, segments_held=telemetry.segments_held if telemetry else 0,
            blocks_held=held,
            queue_overflows=telemetry.queue_overflows if telemetry else 0,
            decode_s_per_block=decode, prefill_s_per_block_token=prefill, compute_source=source,
            decode_batch_scaling=times.decode_batch_scaling if times else None,
            layer_s_per_token=tuple(layer.flops_per_token / flops_per_s for layer in self.layers)
            if flops_per_s > 0 else (),
            last_seen_s=record.last_seen_s,
        )  # fmt: skip

    def _link_capacity(self, src: str, dst: str, now_s: float) -> LinkCapacity:
        link = self._link(src, dst)
        probe, passive = link.bandwidth.planning_value(now_s), link.passive.value(now_s)
        reverse = self._links.get((dst, src))
        if probe is not None and reverse is not None and frozenset((src, dst)) in self.symmetric:
            fell = reverse.bandwidth.fresh_fall(now_s)  # e.g. the loaded way's delivery rate
            if fell is not None and fell < probe and reverse.bandwidth.newest_s(now_s) > link.bandwidth.newest_s(now_s):
                probe = fell
        rtt, loss = link.rtt.planning_value(now_s), link.loss.value(now_s)
        bandwidth, source = (probe, "probe") if probe is not None else (passive, "passive")
        recent = [(b, w) for at_s, b, w in link.probe_traffic if now_s - at_s <= 60.0]
        seconds = math.fsum(w for _, w in recent)
        ends_up = all(name in self.nodes and self.nodes[name].up for name in (src, dst))
        degraded = link.degraded()
        if degraded:
            health = "degraded"
        else:
            armed = link.bandwidth.baseline is not None and link.rtt.baseline is not None
            health = "ok" if ends_up and armed else "unknown"  # ok: baselines to compare with
        return LinkCapacity(
            src=src, dst=dst, bandwidth_bytes_per_s=bandwidth or 0.0,  # type: ignore[arg-type]
            latency_s=rtt / 2 if rtt is not None else 0.0, rtt_s=rtt, loss=min(1.0, loss or 0.0),
            health=health, degraded=degraded,  # type: ignore[arg-type]
            bandwidth_source=source if bandwidth is not None else "none",  # type: ignore[arg-type]
            passive_bandwidth_bytes_per_s=passive,
            probe_bytes_per_s=math.fsum(b for b, _ in recent) / seconds if seconds > 0 else 0.0,
        )  # fmt: skip
