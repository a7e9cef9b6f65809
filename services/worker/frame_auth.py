"""Who may send a worker each frame, and whether the frame proves it (docs/SECURITY.md).

Every frame but a probe carries ``mac``: an HMAC-SHA256 over its header, dtype, shape
and tensor bytes under the key of its sender and receiver in its epoch
(`shared.security.frame_keys.pair_key`): the epoch's key (which only the nodes that got
that epoch's PREPARE or signed plan hold) mixed with the X25519 secret of the two nodes'
keys (each worker's own, the public half announced in its retained NodeStatus). The
header's ``src`` must be the node the plan names as the sender of that hop
(`expected_senders`), and the MAC must verify under the pair key of that ``src`` and
this node. A broker client without the epoch key can therefore neither forge nor alter a
frame, nor move a genuine frame to another epoch (the epoch is under the MAC and each
epoch has its own key); and a worker of the epoch, which holds the epoch key, cannot
claim another member's ``src``: it lacks that member's private key.

A batch frame (several requests' decode steps, shared/frame_headers.py `BatchHeader`)
has one MAC over all its rows under the same pair key: the whole frame has one sender,
the node the plan names for its hop. Its rows are trusted once the frame is (the data
plane splits it only after `check_origin`).

Costs: HMAC-SHA256 hashes about 1.6 GB/s on the dev box (SHA-NI): a few microseconds
for a decode row, about 3 ms for a 2048-token prefill of a 576-wide model; frames over
`OFF_LOOP_BYTES` are hashed on a thread (hashlib releases the GIL). A pair key costs one
X25519 exchange per peer (cached) and one HMAC per epoch and direction (cached).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from services.worker.epochs import EpochKeeper, Serving
from services.worker.errors import FrameForged, FrameRefused
from shared.errors import InvalidPlan
from shared.frame_headers import (
    ActivationHeader,
    BatchHeader,
    FrameHeader,
    HandoffHeader,
    KvAckHeader,
    KvHeader,
    ProbeHeader,
    ReleaseHeader,
    ResultHeader,
)
from shared.planning.route import Route
from shared.security.frame_keys import PeerKeys
from shared.tensor_frame import encode_frame, mac_ok

log = logging.getLogger(__name__)
OFF_LOOP_BYTES = 256 * 1024
"""Frames with more tensor bytes than this are hashed on a worker thread."""
FORGED_LOGGED_EVERY = 100
"""Log the first forged frame and then one in this many (a flood must not flood the log)."""
KEY_WAIT_S = 2.0
"""How long a frame waits for its sender's (or receiver's) announced key: a node's status
and its first frames travel on different connections, so a frame can overtake it."""
Lookup = Callable[[int], Serving | None]
"""The state that serves an epoch (`EpochKeeper.for_frame` at the current time)."""


class FrameAuth:
    """One worker's side of frame authentication: seal what it sends with the pair key of
    the frame's epoch and destination, check what it receives (`check_origin`), count
    forgeries (``frames_forged`` in ``counters``, the data plane's). ``peers``: this
    node's key and the keys its peers announced."""

    def __init__(self, node: str, keeper: EpochKeeper, counters: Counter[str], peers: PeerKeys) -> None:
        self.node, self.keeper, self.counters, self.peers = node, keeper, counters, peers

    async def authentic(self, header: FrameHeader, array: np.ndarray, serving: Serving) -> bool:
        """True for a frame that authenticates; else counts it, logs the first and every
        `FORGED_LOGGED_EVERY`-th, and returns False (the frame is dropped)."""
        now = time.monotonic()
        args = (header, array, serving, lambda epoch: self.keeper.for_frame(epoch, now), self.keeper.current,
                self.peers)  # fmt: skip
        try:
            src = header.src
            if src is not None and not self.peers.knows(src) and src in senders_of(*args[:5]):
                await self.peers.wait_for(src, KEY_WAIT_S)  # a plan's node, not yet announced
            if array.nbytes > OFF_LOOP_BYTES:
                await asyncio.to_thread(check_origin, *args)
            else:
                check_origin(*args)
        except FrameForged as error:
            self.counters["frames_forged"] += 1
            if self.counters["frames_forged"] % FORGED_LOGGED_EVERY == 1:
                log.warning("%s: dropped a forged frame (%d so far): %s", self.node,
                            self.counters["frames_forged"], error)  # fmt: skip
            return False
        return True

    async def seal(self, destination: str, header: FrameHeader, array: np.ndarray) -> bytes:
        """``header`` and ``array`` as a frame for ``destination`` authenticated with their
        pair key in the header's epoch (the committed epoch's when this node no longer
        holds that one).

        Raises FrameRefused when this node serves no epoch at all (it holds no key), or
        when ``destination`` announced no key within `KEY_WAIT_S`.
        """
        serving = self.keeper.for_frame(header.epoch, time.monotonic()) or self.keeper.current
        if serving is None:
            raise FrameRefused(f"no frame key for epoch {header.epoch}: this node serves no epoch")
        if not self.peers.knows(destination) and not await self.peers.wait_for(destination, KEY_WAIT_S):
            raise FrameRefused(f"{destination} announced no frame key (no status from it)")
        key = self.peers.key(serving.frame_key, self.node, destination)
        assert key is not None  # its public key is known
        if array.nbytes > OFF_LOOP_BYTES:
            return await asyncio.to_thread(encode_frame, header, array, key)
        return encode_frame(header, array, key)


def senders_of(header: FrameHeader, array: np.ndarray, serving: Serving, lookup: Lookup,
               current: Serving | None) -> frozenset[str]:  # fmt: skip
    """`expected_senders` of ``header`` in the epoch ``serving`` serves (none for a probe)."""
    if isinstance(header, ProbeHeader):
        return frozenset()
    return expected_senders(header, serving.route, lookup, current)


def check_origin(header: FrameHeader, array: np.ndarray, serving: Serving, lookup: Lookup,
                 current: Serving | None, peers: PeerKeys) -> None:  # fmt: skip
    """Accept ``header`` (served by ``serving``, the state of its epoch) only when its
    ``src`` is a sender that hop may have and its MAC verifies under the pair key of that
    sender and this node (``peers.node``) in its epoch (a kv_ack also in the committed
    epoch: a new owner may not hold the old epoch's key). ``lookup``: the state of
    another epoch (a handoff's or kv frame's other one).

    Raises FrameForged saying which check failed. A probe is never checked here: the data
    plane ignores probes (the prober has its own subscription and touches no request).
    """
    if isinstance(header, ProbeHeader):
        raise FrameForged("a probe frame is not a data-plane frame")
    if not header.mac:
        raise FrameForged(f"{header.kind} frame of request {header.request_id} has no MAC")
    senders = expected_senders(header, serving.route, lookup, current)
    if header.src is None or header.src not in senders:
        raise FrameForged(f"{header.kind} frame of request {header.request_id} says it is from "
                          f"{header.src}; epoch {header.epoch} has it sent by "
                          f"{', '.join(sorted(senders)) or 'no node'}")  # fmt: skip
    states = [serving]
    if isinstance(header, KvAckHeader) and current is not None and current is not serving:
        states.append(current)
    keys = [peers.key(state.frame_key, header.src, peers.node) for state in states]
    if all(key is None for key in keys):
        raise FrameForged(f"{header.kind} frame of request {header.request_id}: {header.src} "
                          f"announced no frame key")  # fmt: skip
    if not any(key is not None and mac_ok(key, header, array) for key in keys):
        raise FrameForged(f"{header.kind} frame of request {header.request_id}: bad MAC for "
                          f"{header.src} -> {peers.node} in epoch {header.epoch}")  # fmt: skip


def expected_senders(header: FrameHeader, route: Route, lookup: Lookup,
                     current: Serving | None) -> frozenset[str]:  # fmt: skip
    """The nodes that may send ``header`` under ``route`` (its epoch's route): an
    activation or release for block t, the owner of block t - 1 (the entry for t = 0); a
    result, the owner of the last block (any node of the route for ``kv_missing``); a
    batch frame, the sender its rows' activations or results would have; a
    handoff, the entry of the old or new epoch; a kv frame, the old epoch's owner of its
    blocks; a kv_ack, a node of the old or the committed epoch. Empty when the plan has no
    such sender (a block outside the model, an epoch this node no longer knows)."""
    try:
        match header:
            case ActivationHeader() | ReleaseHeader():
                target = header.target
                if target > route.num_layers:
                    return frozenset()
                return frozenset({route.entry if target == 0 else route.owner_of_block(target - 1)})
            case BatchHeader():  # one MAC over every row; one sender for the whole hop
                if header.of == "result":
                    last = route.num_layers
                    return frozenset({route.owner_of_block(last - 1)}) if header.target == last else frozenset()
                if not 0 < header.target < route.num_layers:
                    return frozenset()
                return frozenset({route.owner_of_block(header.target - 1)})
            case ResultHeader():
                if header.kv_missing:
                    return frozenset(route.nodes())
                return frozenset({route.owner_of_block(route.num_layers - 1)})
            case HandoffHeader():
                new = lookup(header.new_epoch)
                return frozenset({route.entry, *((new.route.entry,) if new is not None else ())})
            case KvHeader():
                old = lookup(header.old_epoch)
                if old is None:
                    return frozenset()
                owners = {old.route.owner_of_block(block) for block in header.blocks}
                return frozenset(owners) if len(owners) == 1 else frozenset()
            case KvAckHeader():
                return frozenset(route.nodes()) | frozenset(current.route.nodes() if current else ())
    except InvalidPlan:
        return frozenset()
    return frozenset()
