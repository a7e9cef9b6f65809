"""Who may send a worker each frame, and whether the frame proves it (docs/SECURITY.md).

Every frame but a probe carries ``mac``: an HMAC-SHA256 over its header, dtype, shape
and tensor bytes under the key of its epoch (shared/security/frame_keys.py), which only
the nodes that got that epoch's PREPARE or signed plan hold. The MAC proves that a
holder of the key sent the frame and that nothing in it changed; the header's ``src``
must then be the node the plan names as the sender of that hop (`expected_senders`).
A broker client without the key can therefore neither forge nor alter a frame, nor
move a genuine frame to another epoch (the epoch is under the MAC and each epoch has its
own key). A node that holds the key (a worker of the epoch) could still claim another
member's ``src``: the key is shared by the epoch's workers, not per pair.

A batch frame (several requests' decode steps, shared/frame_headers.py `BatchHeader`)
has one MAC over all its rows under the same epoch key: a per-row MAC would prove
nothing more, since every row of an epoch is sealed with that one key, and the whole
frame has one sender, the node the plan names for its hop. Its rows are trusted once
the frame is (the data plane splits it only after `check_origin`).

Costs: HMAC-SHA256 hashes about 1.6 GB/s on the dev box (SHA-NI): a few microseconds
for a decode row, about 3 ms for a 2048-token prefill of a 576-wide model; frames over
`OFF_LOOP_BYTES` are hashed on a thread (hashlib releases the GIL).
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
from shared.tensor_frame import encode_frame, mac_ok

log = logging.getLogger(__name__)
OFF_LOOP_BYTES = 256 * 1024
"""Frames with more tensor bytes than this are hashed on a worker thread."""
FORGED_LOGGED_EVERY = 100
"""Log the first forged frame and then one in this many (a flood must not flood the log)."""
Lookup = Callable[[int], Serving | None]
"""The state that serves an epoch (`EpochKeeper.for_frame` at the current time)."""


class FrameAuth:
    """One worker's side of frame authentication: seal what it sends with the key of the
    frame's epoch, check what it receives (`check_origin`), count forgeries
    (``frames_forged`` in ``counters``, the data plane's)."""

    def __init__(self, node: str, keeper: EpochKeeper, counters: Counter[str]) -> None:
        self.node, self.keeper, self.counters = node, keeper, counters

    async def authentic(self, header: FrameHeader, array: np.ndarray, serving: Serving) -> bool:
        """True for a frame that authenticates; else counts it, logs the first and every
        `FORGED_LOGGED_EVERY`-th, and returns False (the frame is dropped)."""
        now = time.monotonic()
        args = (header, array, serving, lambda epoch: self.keeper.for_frame(epoch, now), self.keeper.current)
        try:
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

    async def seal(self, header: FrameHeader, array: np.ndarray) -> bytes:
        """``header`` and ``array`` as a frame authenticated with the key of the header's
        epoch (the committed epoch's when this node no longer holds that one).

        Raises FrameRefused when this node serves no epoch at all (it holds no key).
        """
        serving = self.keeper.for_frame(header.epoch, time.monotonic()) or self.keeper.current
        if serving is None:
            raise FrameRefused(f"no frame key for epoch {header.epoch}: this node serves no epoch")
        if array.nbytes > OFF_LOOP_BYTES:
            return await asyncio.to_thread(encode_frame, header, array, serving.frame_key)
        return encode_frame(header, array, serving.frame_key)


def check_origin(header: FrameHeader, array: np.ndarray, serving: Serving, lookup: Lookup,
                 current: Serving | None) -> None:  # fmt: skip
    """Accept ``header`` (served by ``serving``, the state of its epoch) only when its MAC
    verifies under the key of its epoch (a kv_ack also under the committed epoch's key:
    a new owner may not hold the old epoch's) and its ``src`` is a sender that hop may
    have. ``lookup``: the state of another epoch (a handoff's or kv frame's other one).

    Raises FrameForged saying which check failed. A probe is never checked here: the data
    plane ignores probes (the prober has its own subscription and touches no request).
    """
    if isinstance(header, ProbeHeader):
        raise FrameForged("a probe frame is not a data-plane frame")
    if not header.mac:
        raise FrameForged(f"{header.kind} frame of request {header.request_id} has no MAC")
    states = [serving]
    if isinstance(header, KvAckHeader) and current is not None and current is not serving:
        states.append(current)
    verified = next((state for state in states if mac_ok(state.frame_key, header, array)), None)
    if verified is None:
        raise FrameForged(f"{header.kind} frame of request {header.request_id}: bad MAC for "
                          f"epoch {header.epoch}")  # fmt: skip
    senders = expected_senders(header, serving.route, lookup, current)
    if header.src is None or header.src not in senders:
        raise FrameForged(f"{header.kind} frame of request {header.request_id} says it is from "
                          f"{header.src}; epoch {header.epoch} has it sent by "
                          f"{', '.join(sorted(senders)) or 'no node'}")  # fmt: skip


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
