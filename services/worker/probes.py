"""Link profiling: active probe pairs through the broker, and passive timing of activations.

Active: every ``probe_period_s`` (jittered +-30 %) a worker sends each peer a small probe
frame and, right behind it, a sized one, both through its EgressShaper on the data
connection, so the emulated link is what gets measured. The peer echoes each with a
header-only frame through its own shaper. The small probe's round trip is the RTT; the
gap between the two echoes is the time the sized probe occupied the link (packet-pair
dispersion), so bandwidth = sized frame bytes / gap, from the sender's clock alone. An
echo says how long it waited in the peer's egress queue behind frames the peer was
sending back (``held_s``): the prober takes that off the echo's arrival. Without it, on
a link carrying traffic the echo of the sized probe could wait behind a result frame, the
gap grew by that frame's time on the link, and a busy link measured slower than an idle
one beside it (smart-city, 2026-12-07: the migrate policy moved off a link for that).
The first round to a peer has no estimate to size its probe (``probe_min_bytes``, a few
ms of link time, no more than event-loop jitter at start-up): it only sizes the next
round and is not reported. An echo missing after ``probe_timeout_s`` counts as lost.

Budget: probing a link costs link time. Each peer has a credit of link-seconds that
refills at ``probe_budget_fraction`` per second (capped at ``probe_burst_s``); a round
starts only when the credit covers its expected occupancy, and is charged what it
actually occupied. Over any minute probes thus use at most budget_fraction of the link
plus one burst. The sized probe targets ``probe_dispersion_s`` of link time at the
current estimate, between ``probe_min_bytes`` and ``probe_max_bytes``.

Passive: every activation frame carries its sender (``src``) and send time (``sent_at``,
Unix seconds) in its header; the receiver estimates the inbound bandwidth from how the
one-way delay grows with frame size (the clock offset cancels in the difference).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Literal

import numpy as np

from shared.errors import EdgesplitError
from shared.frame_headers import (
    ActivationHeader,
    BatchHeader,
    ProbeHeader,
    ReleaseHeader,
    ResultHeader,
)
from shared.ids import NodeId, RequestId
from shared.messages import LinkObservation
from shared.tensor_frame import Frame, encode_frame
from shared.topics import ACTIVATIONS, NODE_STATUS

if TYPE_CHECKING:
    from services.worker.settings import WorkerSettings
    from shared.bus import Bus

log = logging.getLogger(__name__)

_SMALL_BYTES = 64
_PASSIVE_WINDOW_S = 30.0
_MIN_GAP_S = 50e-6
_LATE_ECHO_S = 30.0
_LATE_KEPT = 32
_SIZED_MIN_BYTES = 512
"""A sized probe is at least this big: 64 ms of an 8 kB/s link, far above _RESOLUTION_S."""
_RESOLUTION_S = 1e-3
"""Gaps shorter than this are event-loop jitter: such links are 'at least L / 1 ms' fast."""
_SCOUT_BYTES = 2048
"""A round whose sized probe would be bigger first sends one of this size: on a link that
fell, a probe sized from the old estimate would occupy it for seconds (128 kB at 50 kB/s:
2.6 s, with every activation queued behind it) and answer only when it is through."""
_SCOUT_RESOLVED_S = 4 * _RESOLUTION_S
"""A scout whose dispersion is at least this measures the link, though it is shorter than
probe_dispersion_s: under FALL x the estimate it is the first sign of a fall (300 kB/s
after 11 MB/s: 6.8 ms), and the pair it calls is sized from it (CONFIRM_S), not from the
old estimate (128 kB at 300 kB/s: 0.44 s of the link, and at 60 kB/s over 2 s: V2X,
2026-12-07)."""
FALL = 0.5
"""A pair measuring under this share of the estimate is a fall: probe again at once to
confirm it, and restart the window's samples (the earlier ones measured the old link)."""
JITTER_S = 0.03
"""A fall must also stretch the pair's dispersion by this much over what the estimate
predicts: on a loaded 2-core machine event-loop stalls of 10-20 ms are common, and one
would halve the estimate of a 12.5 MB/s link (128 kB in 10 ms)."""
CONFIRM_S = 2 * JITTER_S
"""A pair called by a scout that showed a fall targets this much link time at the scout's
rate: if the fall is real it stretches JITTER_S past what the old estimate predicts and
passes the same guard as any first fall; if the scout only met an event-loop stall, the
pair is a fraction of a millisecond on the real link (under-resolved: never a fall)."""
RTT_RISE, RTT_MIN_RISE_S = 1.5, JITTER_S
"""A round trip above RTT_RISE x the last reported one and RTT_MIN_RISE_S more is a rise."""
RTT_AGREE = 3
"""Round trips of one window that must all have risen for the window to be news (a rise
calls a round at once, so they come within a fraction of a second)."""


@dataclass
class _Peer:
    """Probe bookkeeping for one destination."""

    next_round_s: float
    credit_s: float  # link-seconds this peer's probes may still use
    refilled_s: float
    bandwidth: float | None = None  # newest estimate, bytes/s (sizes the next probe)
    rtts: list[float] = field(default_factory=list)
    bandwidths: list[float] = field(default_factory=list)
    sent: int = 0
    lost: int = 0
    probe_bytes: int = 0
    # probe id -> (sent at, kind "small"/"large", frame bytes, round id)
    outstanding: dict[int, tuple[float, str, int, int]] = field(default_factory=dict)
    late: dict[int, tuple[float, str, int, int]] = field(default_factory=dict)
    """Probes counted lost (no echo within the timeout) whose echo may still come: on a
    saturated slow link the echo waits behind activation frames; when it comes, the pair's
    dispersion still measures the link (and the RTT its queueing). Bounded, oldest dropped."""
    echoes: dict[int, dict[str, tuple[float, int]]] = field(default_factory=dict)
    """round -> kind -> (echo arrival, probe frame bytes)"""
    passive: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=64))
    scouts: set[int] = field(default_factory=set)
    """Rounds whose sized probe was a scout (_SCOUT_BYTES, not sized from the estimate)."""
    sized_until_s: float = -1.0
    """The last scout was under-resolved (the link is fast): a round until then is sized
    (the one the scout calls at once; a later round scouts again)."""
    reported_bandwidth: float | None = None
    reported_rtt: float | None = None
    """The medians of the last window (what a fall or rise is judged against)."""
    fallen: int = 0
    """Pairs of this window that measured a fall (all of its pairs, since a fall restarts it)."""
    scout_fell: bool = False
    """The last scout was resolved and measured the link under FALL x the estimate: the
    pair it calls is sized from the scout, for CONFIRM_S of link time at its rate."""

    @property
    def confirming(self) -> bool:
        """A fall was seen and awaits its confirming pair (which then waits for no credit)."""
        return self.scout_fell or self.fallen == 1


class LinkProber:
    """Probes the links to every peer and echoes the peers' probes.

    ``send(destination, frame_bytes)`` is the worker's shaper. ``peers`` limits probing
    to those nodes (None: every node whose retained status is online).
    """

    def __init__(
        self,
        node: str,
        settings: WorkerSettings,
        send: Callable[[str, bytes], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        queue_wait: Callable[[str], float] | None = None,
    ) -> None:
        self.node, self.settings, self._send, self._clock = node, settings, send, clock
        self._queue_wait = queue_wait
        """The shaper's wait behind earlier frames to a destination (an echo says it)."""
        self._rng = rng or random.Random()
        self._allowed = set(settings.probe_peers) if settings.probe_peers is not None else None
        self._online: set[str] = set()
        self._peers: dict[str, _Peer] = {}
        self._ids = iter(lambda: secrets.randbits(63), None)  # a forged echo cannot guess one
        self._rounds = count(1)
        self.counters: dict[str, int] = {"echoed": 0}
        self.news = asyncio.Event()
        """Set when two or more probes of the current window agree that a link fell (or
        its round trip rose): the telemetry reporter then sends its window at once."""

    # --- running ----------------------------------------------------------------------------

    async def run(self, bus: Bus) -> None:
        """Watch peers, receive probes/echoes/activations, and probe, until cancelled."""
        if self.settings.probe_period_s <= 0:
            return
        async with asyncio.TaskGroup() as task_group:
            task_group.create_task(self._watch_peers(bus), name="probe-peers")
            task_group.create_task(self._receive(bus), name="probe-receive")
            task_group.create_task(self._probe_loop(), name="probe-send")

    async def _watch_peers(self, bus: Bus) -> None:
        async with bus.subscribe(NODE_STATUS) as statuses:
            async for params, status in statuses:
                node = params.get("node", "")
                if node == self.node or status.node != node:
                    continue
                self.set_online(node, status.state == "online")

    async def _receive(self, bus: Bus) -> None:
        # A subscription of our own: arrival times are not delayed by the worker's compute.
        async with bus.subscribe(ACTIVATIONS, node=self.node) as frames:
            async for _, frame in frames:
                try:
                    await self.on_frame(frame, self._clock(), time.time())
                except EdgesplitError as error:
                    log.info("%s: probe echo not sent: %s", self.node, error)

    async def _probe_loop(self) -> None:
        tick_s = min(0.1, self.settings.probe_period_s / 4)
        while True:
            now_s = self._clock()
            for name in sorted(self._targets()):
                peer = self._peer(name, now_s)
                self._expire(peer, now_s)
                if now_s >= peer.next_round_s:
                    try:
                        await self.start_round(name, now_s)
                    except EdgesplitError as error:
                        log.info("%s: probe to %s not sent: %s", self.node, name, error)
            await asyncio.sleep(tick_s)

    def set_online(self, node: str, online: bool) -> None:
        """Whether ``node`` is online (its retained status): only online peers are probed."""
        (self._online.add if online else self._online.discard)(node)

    def next_round_s(self, name: str, now_s: float) -> float:
        """When the next probe round to ``name`` is due (clock s); the first is drawn at
        random within one probe period of ``now_s``."""
        return self._peer(name, now_s).next_round_s

    def _targets(self) -> set[str]:
        return self._online if self._allowed is None else self._online & self._allowed

    def _peer(self, name: str, now_s: float) -> _Peer:
        peer = self._peers.get(name)
        if peer is None:
            first_s = now_s + self._rng.uniform(0, self.settings.probe_period_s)
            peer = self._peers[name] = _Peer(first_s, self.settings.probe_burst_s, now_s)
        return peer

    # --- sending ----------------------------------------------------------------------------

    def probe_size(self, peer: _Peer) -> int:
        """Tensor bytes of the sized probe: probe_dispersion_s of link time at the estimate."""
        settings = self.settings
        if peer.bandwidth is None:
            return settings.probe_min_bytes
        wanted = int(peer.bandwidth * (CONFIRM_S if peer.scout_fell else settings.probe_dispersion_s))
        return max(_SIZED_MIN_BYTES, min(settings.probe_max_bytes, wanted))

    async def start_round(self, name: str, now_s: float) -> None:
        """Send ``name`` a probe pair (a small and a sized probe, back to back) at ``now_s``
        unless the link's probe budget is spent; sets when the next round is due. Raises
        what the egress raises (EdgesplitError when the frame cannot be published)."""
        settings = self.settings
        peer = self._peer(name, now_s)
        size = self.probe_size(peer)
        # No scout before the link's first reported window: there is no fall to catch yet, and
        # a scout round would put off the first sample the monitor plans with by a round.
        scout = (peer.reported_bandwidth is not None and size > _SCOUT_BYTES
                 and now_s > peer.sized_until_s)  # fmt: skip
        if scout:
            size = _SCOUT_BYTES
        self._refill(peer, now_s)
        if peer.bandwidth is not None and not peer.confirming:
            # A round longer than the burst starts once the credit is full: it is charged what it
            # occupied and pays that back before the next, so a slow link is still measured.
            needed_s = min((size + _SMALL_BYTES) / peer.bandwidth, settings.probe_burst_s)
            if peer.credit_s < needed_s:
                peer.next_round_s = now_s + settings.probe_period_s / 4  # wait for credit
                return
        round_id = next(self._rounds)
        peer.sized_until_s = -1.0
        if scout:
            peer.scouts.add(round_id)
        small = self._frame("ping", next(self._ids), _SMALL_BYTES)
        large = self._frame("ping", next(self._ids), size)
        for (probe_id, payload), kind in ((small, "small"), (large, "large")):
            peer.outstanding[probe_id] = (self._clock(), kind, len(payload), round_id)
            peer.sent += 1
            peer.probe_bytes += len(payload)
            await self._send(name, payload)  # shaped links queue at once: the pair stays tight
        jitter = self._rng.uniform(0.7, 1.3)
        peer.next_round_s = now_s + settings.probe_period_s * jitter

    def _frame(self, role: Literal["ping", "echo"], probe_id: int, size: int,
               held_s: float = 0.0) -> tuple[int, bytes]:  # fmt: skip
        """A probe frame from this node: ``probe_id`` travels as its seq; ``size`` bytes of
        padding; an echo's ``held_s`` (see ProbeHeader)."""
        header = ProbeHeader(request_id=RequestId("probe"), step=0, epoch=0, seq=probe_id,
                             role=role, src=NodeId(self.node), held_s=float(min(held_s, 3600.0)))  # fmt: skip
        return probe_id, encode_frame(header, np.zeros(size, np.uint8))

    def _expire(self, peer: _Peer, now_s: float) -> None:
        timeout_s = self.settings.probe_timeout_s
        for probe_id, (sent_s, _, _, _round) in list(peer.outstanding.items()):
            if now_s - sent_s > timeout_s:
                peer.late[probe_id] = peer.outstanding.pop(probe_id)
                peer.lost += 1
        for probe_id, (sent_s, _, _, round_id) in list(peer.late.items()):
            if now_s - sent_s > _LATE_ECHO_S or len(peer.late) > _LATE_KEPT:
                del peer.late[probe_id]
                peer.echoes.pop(round_id, None)
                peer.scouts.discard(round_id)

    # --- receiving --------------------------------------------------------------------------

    async def on_frame(self, frame: Frame, now_s: float, wall_s: float) -> None:
        """Echo a ping, account an echo, or take a passive sample of a forwarded frame
        (``now_s``: the prober's clock; ``wall_s``: Unix s, to compare with its ``sent_at``)."""
        header = frame.header
        if isinstance(header, ActivationHeader | ResultHeader | ReleaseHeader | BatchHeader):
            src, sent_at = header.src, header.sent_at
            if src is not None and src != self.node and sent_at is not None and self._allowed_peer(src):
                peer = self._peer(src, now_s)
                peer.passive.append((now_s, int(frame.array.nbytes),
                                     wall_s - sent_at))  # fmt: skip
            return
        if not isinstance(header, ProbeHeader) or header.src == self.node:
            return
        src, probe_id = header.src, header.seq
        if header.role == "ping":
            held_s = self._queue_wait(src) if self._queue_wait is not None else 0.0
            _, echo = self._frame("echo", probe_id, 0, held_s)
            self.counters["echoed"] += 1
            echoed_to = self._peers.get(src)
            if echoed_to is not None:
                echoed_to.probe_bytes += len(echo)
            await self._send(src, echo)
        elif src in self._peers:  # an echo of one of ours
            self._on_echo(self._peers[src], probe_id, now_s, header.held_s)

    def _allowed_peer(self, name: str) -> bool:
        return self._allowed is None or name in self._allowed

    def _on_echo(self, peer: _Peer, probe_id: int, now_s: float, held_s: float = 0.0) -> None:
        found = peer.outstanding.pop(probe_id, None) or peer.late.pop(probe_id, None)
        if found is None:
            return  # not ours, or too late to be of use
        sent_s, kind, nbytes, round_id = found
        if kind == "small":
            self._rtt_sample(peer, now_s - sent_s, now_s)
        arrivals = peer.echoes.setdefault(round_id, {})
        arrivals[kind] = (now_s - held_s, nbytes)  # as if the echo had not queued at the peer
        if "small" in arrivals and "large" in arrivals:
            del peer.echoes[round_id]
            (small_s, _), (large_s, large_bytes) = arrivals["small"], arrivals["large"]
            gap_s = max(_RESOLUTION_S, large_s - small_s)
            if round_id in peer.scouts:
                peer.scouts.discard(round_id)
                if gap_s < self.settings.probe_dispersion_s:
                    # Too short to measure the link by: a sized pair now, sized from the estimate,
                    # or from the scout when the scout already shows the link well under it.
                    reference = peer.reported_bandwidth or peer.bandwidth
                    scouted = large_bytes / gap_s
                    if (reference is not None and large_s - small_s >= _SCOUT_RESOLVED_S
                            and scouted < FALL * reference):  # fmt: skip
                        peer.bandwidth, peer.scout_fell = scouted, True
                    peer.sized_until_s = now_s + self.settings.probe_period_s / 4
                    peer.next_round_s = min(peer.next_round_s, now_s)
                    self._charge(peer, gap_s, now_s)
                    return
            first, previous = peer.bandwidth is None, peer.bandwidth
            peer.bandwidth = large_bytes / gap_s
            if not first:  # the first round's probe was not sized for the link: it only sizes the next
                self._bandwidth_sample(peer, large_bytes, gap_s, previous, now_s,
                                       resolved=large_s - small_s > 2 * _RESOLUTION_S)  # fmt: skip
            if large_s - small_s <= 2 * _RESOLUTION_S and large_bytes < self.settings.probe_max_bytes:
                # Under-resolved: the link is faster than this probe can show (it rose since the
                # estimate sized it). Probe again at once with the bigger size the new estimate
                # gives, so a link that came back is known in a few rounds, not a few periods.
                peer.next_round_s = min(peer.next_round_s, now_s)
            self._charge(peer, gap_s, now_s)

    def _charge(self, peer: _Peer, gap_s: float, now_s: float) -> None:
        """Charge ``peer``'s credit the link time a probe occupied."""
        self._refill(peer, now_s)
        peer.credit_s -= gap_s
        if peer.credit_s < 0 and not peer.confirming:  # over budget (the link slowed): wait until paid back
            payback_s = -peer.credit_s / self.settings.probe_budget_fraction
            peer.next_round_s = max(peer.next_round_s, now_s + payback_s)

    def _bandwidth_sample(self, peer: _Peer, nbytes: int, gap_s: float, previous: float | None,
                          now_s: float, resolved: bool = True) -> None:  # fmt: skip
        """Take a pair's bandwidth (``nbytes`` in ``gap_s``). A fall (under FALL x the last
        window's median, or the estimate before the first window; the first one also
        JITTER_S more link time than that predicts) restarts the window's samples and is
        confirmed by another round at once, which waits for no probe credit; once two pairs
        agree on it, the window is news. An under-resolved pair (``resolved`` False) only
        says "at least this fast": never a fall."""
        sample = nbytes / gap_s
        reference = peer.reported_bandwidth or previous
        fell = resolved and reference is not None and sample < FALL * reference
        if fell and peer.fallen == 0:
            # The first must stand out from a stall; a confirming pair is sized from the fallen
            # estimate, so on a link that did not fall it measures the link and refutes it.
            fell = reference is not None and gap_s - nbytes / reference >= JITTER_S
        peer.scout_fell = False
        if fell and peer.fallen == 0:
            peer.bandwidths = []
        if fell:
            peer.fallen += 1
            peer.next_round_s = min(peer.next_round_s, now_s)
        peer.bandwidths.append(sample)
        if peer.fallen >= 2 and peer.fallen == len(peer.bandwidths):
            self.news.set()

    def _rtt_sample(self, peer: _Peer, rtt_s: float, now_s: float) -> None:
        """Take a small probe's round trip. A rise restarts the window's samples (the
        earlier ones measured the old link) and calls another round at once; RTT_AGREE
        risen round trips make the window news."""
        reported = peer.reported_rtt

        def risen(value: float) -> bool:
            return reported is not None and value > max(RTT_RISE * reported, reported + RTT_MIN_RISE_S)

        if risen(rtt_s):
            if peer.rtts and not risen(max(peer.rtts)):
                peer.rtts = []
            peer.next_round_s = min(peer.next_round_s, now_s)
        peer.rtts.append(rtt_s)
        if len(peer.rtts) >= RTT_AGREE and risen(min(peer.rtts)):
            self.news.set()

    def _refill(self, peer: _Peer, now_s: float) -> None:
        settings = self.settings
        earned_s = (now_s - peer.refilled_s) * settings.probe_budget_fraction
        peer.credit_s = min(settings.probe_burst_s, peer.credit_s + earned_s)
        peer.refilled_s = now_s

    # --- reporting --------------------------------------------------------------------------

    def window(self, delivered: Mapping[str, float] | None = None) -> tuple[LinkObservation, ...]:
        """Observations per peer since the previous window (resets the window);
        ``delivered``: the egress delivery rate per peer (`EgressShaper.delivery_rates`)."""
        now_s = self._clock()
        observations = []
        for name in sorted(self._peers):
            peer = self._peers[name]
            inbound, samples = passive_bandwidth(peer.passive, now_s - _PASSIVE_WINDOW_S)
            rtt = statistics.median(peer.rtts) if peer.rtts else None
            bandwidth = statistics.median(peer.bandwidths) if peer.bandwidths else None
            observations.append(LinkObservation(
                peer=name,  # type: ignore[arg-type]
                rtt_s=rtt, bandwidth_bytes_per_s=bandwidth,
                bandwidth_samples=len(peer.bandwidths), rtt_samples=len(peer.rtts),
                bandwidth_high_bytes_per_s=max(peer.bandwidths) if peer.bandwidths else None,
                rtt_low_s=min(peer.rtts) if peer.rtts else None,
                probes_sent=peer.sent, probes_lost=peer.lost, probe_bytes=peer.probe_bytes,
                inbound_bandwidth_bytes_per_s=inbound, inbound_samples=samples,
                delivery_bandwidth_bytes_per_s=(delivered or {}).get(name),
            ))  # fmt: skip
            peer.reported_rtt = rtt if rtt is not None else peer.reported_rtt
            peer.reported_bandwidth = bandwidth if bandwidth is not None else peer.reported_bandwidth
            peer.rtts, peer.bandwidths, peer.fallen = [], [], 0
            peer.sent = peer.lost = peer.probe_bytes = 0
        return tuple(observations)


def passive_bandwidth(
    samples: deque[tuple[float, int, float]], since_s: float
) -> tuple[float | None, int]:
    """Inbound bandwidth from (arrival, bytes, one-way delay) samples newer than ``since_s``.

    The smallest frames give the delay floor (latency + clock offset); each clearly
    larger frame gives (extra bytes) / (extra delay); the median of those is the
    estimate. None without at least two small and two large frames (4x the size).
    """
    recent = [(nbytes, delay) for at_s, nbytes, delay in samples if at_s >= since_s]
    if len(recent) < 4:
        return None, len(recent)
    sizes = sorted(nbytes for nbytes, _ in recent)
    small_limit = sizes[len(sizes) // 4]
    small = [(b, d) for b, d in recent if b <= small_limit]
    large = [(b, d) for b, d in recent if b >= 4 * max(1, small_limit)]
    if len(small) < 2 or len(large) < 2:
        return None, len(recent)
    floor_bytes = statistics.median(b for b, _ in small)
    floor_delay = min(d for _, d in small)
    rates = [(b - floor_bytes) / (d - floor_delay) for b, d in large if d - floor_delay > _MIN_GAP_S]
    return (statistics.median(rates) if rates else None), len(recent)
