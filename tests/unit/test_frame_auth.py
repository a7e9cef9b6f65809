"""Frame authentication (services/worker/frame_auth.py): two real data planes in-process.

Node ``a`` is the entry and runs blocks [0, 2) of a tiny llama; node ``b`` runs [2, 4)
(the pair of tests/unit/test_frame_checks.py). A frame with no MAC or a wrong one, one
whose values or epoch were changed after it was sealed, one that names a sender the plan
does not have for that hop, and a replay of an older epoch are all dropped and counted
(``frames_forged``; a fenced epoch as ``frames_fenced``) without any compute or KV
cache; the genuine frame is accepted and a pass still equals the unsplit model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from services.worker.dataplane import new_pass_id
from services.worker.epochs import Serving
from shared.errors import ConfigError
from shared.frame_headers import (
    ActivationHeader,
    KvHeader,
    ProbeHeader,
    ReleaseHeader,
    ResultHeader,
)
from shared.messages import PrepareEpoch
from shared.planning.route import Route
from shared.security.frame_keys import PeerKeys, derive_frame_key, parse_frame_key
from shared.tensor_frame import Frame, decode_frame, encode_frame
from tests.integration.cluster import make_plan
from tests.unit import test_broadcaster_logic as broadcast
from tests.unit.test_frame_checks import (  # noqa: F401 - make_pair and source are fixtures
    KEY,
    PEERS,
    ROUTE,
    Pair,
    _activation,
    _kv,
    _kv_array,
    _pass_equals_reference,
    _row,
    make_pair,
    sealed,
    source,
)

OTHER_KEY = bytes(range(1, 33))
EPOCH_2 = Route(epoch=2, entry="a", num_layers=4, segments=(("a", 0, 2), ("b", 2, 4)))
KEY_2 = bytes(range(2, 34))


async def _dropped(pair: Pair, frame: Frame, counter: str = "frames_forged") -> None:
    """``frame`` reaches b and is dropped: counted once, nothing computed, no KV, no reply."""
    before, refused = pair.b.counters[counter], pair.b.counters["frames_refused"]
    await pair.b.on_frame(frame)
    assert pair.b.counters[counter] == before + 1
    assert pair.b.counters["frames_refused"] == refused
    assert pair.host_b.requests() == 0 and pair.sent_by_b == []


def test_only_the_genuine_frame_from_the_hops_sender_is_accepted(make_pair: Callable[[], Pair]) -> None:  # noqa: F811
    async def main() -> None:
        pair = make_pair()
        header, row = _activation(step=1), _row(1)
        await _dropped(pair, Frame(*decode_frame(encode_frame(header, row))))  # no MAC
        await _dropped(pair, sealed(header, row, "a", OTHER_KEY))  # a guessed key
        genuine = sealed(header, row, "a")
        await _dropped(pair, Frame(genuine.header, row + 1.0))  # values changed after sealing
        moved = genuine.header.model_copy(update={"pos": 1})
        await _dropped(pair, Frame(moved, genuine.array))  # header changed after sealing
        await _dropped(pair, sealed(header, row, "b"))  # b is on the route, not this hop's sender
        await _dropped(pair, sealed(header, row, "mallory"))  # a node not in the plan
        await _dropped(pair, Frame(*decode_frame(encode_frame(header, row, KEY))))  # sealed, no src
        # kv for b's blocks claimed by a (their old owner is b); a release from b to itself
        await _dropped(pair, sealed(_kv(step=3), _kv_array(), "a"))
        await _dropped(pair, sealed(ReleaseHeader(request_id="h1", step=0, epoch=1, seq=0, target=2), _row(0), "b"))  # type: ignore[arg-type]
        # c, a worker holding the epoch key, claims a (the hop's genuine sender): its own
        # X25519 key with a's or with b's public key is not the pair key of a and b
        await _dropped(pair, sealed(header, row, "a", by="c"))
        with_b = PEERS["c"].key(KEY, "c", "b")
        assert with_b is not None
        await _dropped(pair, Frame(*decode_frame(encode_frame(header.model_copy(update={"src": "a"}), row, with_b))))
        # the epoch key alone (what every worker holds) is not the pair key either
        await _dropped(pair, Frame(*decode_frame(encode_frame(header.model_copy(update={"src": "a"}), row, KEY))))
        # a's genuine frame for another node (its pair key with c) is not b's
        await _dropped(pair, sealed(header, row, "a", to="c"))
        assert pair.b.counters["frames_forged"] == 13
        # forged frames were not remembered: the genuine one is no duplicate and is run
        await pair.b.on_frame(genuine)
        assert pair.host_b.requests() == 1 and pair.b.counters["frames_duplicate"] == 0
        [(destination, result)] = pair.sent_by_b
        assert destination == "a" and isinstance(result.header, ResultHeader)
        assert result.header.src == "b" and len(result.header.mac) == 32

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_replay_of_an_older_epoch_is_dropped(make_pair: Callable[[], Pair]) -> None:  # noqa: F811
    async def main() -> None:
        pair = make_pair()
        old = sealed(_activation(step=1), _row(1), "a")  # captured under epoch 1
        pair.b.keeper.prepare(Serving(EPOCH_2, pair.host_b, None, KEY_2))
        pair.b.keeper.commit(2, time.monotonic())
        # re-labelled for the new epoch: the epoch is under the MAC and epoch 2 has its own key
        await _dropped(pair, Frame(old.header.model_copy(update={"epoch": 2}), old.array))
        # resealed with epoch 1's key (known to a past member) but labelled epoch 2
        await _dropped(pair, sealed(_activation(step=1).model_copy(update={"epoch": 2}), _row(1), "a", KEY))
        # after epoch 1 drained, the original is fenced
        pair.b.keeper.expire(time.monotonic() + 3600)
        await _dropped(pair, old, "frames_fenced")
        assert pair.b.counters["frames_forged"] == 2

    asyncio.run(asyncio.wait_for(main(), 60))


def test_forged_results_cannot_answer_a_pass_and_probes_touch_no_request(
    make_pair: Callable[[], Pair], source: object  # noqa: F811
) -> None:
    """While a pass waits, a forged result carrying its (here, known) pass id and a zero
    hidden state reaches the entry first: it is dropped, and the pass ends with b's
    genuine result, equal to the unsplit model's."""

    def forge_first(frame: Frame) -> list[Frame]:
        if not isinstance(frame.header, ResultHeader):
            return [frame]
        fake = np.zeros_like(frame.array)
        probe = ProbeHeader(request_id=frame.header.request_id, step=0, epoch=1, seq=1, role="ping", src="b")  # type: ignore[arg-type]
        return [Frame(frame.header, fake), sealed(frame.header, fake, "b", OTHER_KEY),
                Frame(*decode_frame(encode_frame(probe, np.zeros(8, np.uint8)))), frame]  # fmt: skip

    async def main() -> None:
        pair = make_pair()
        pair.tamper_to_a = forge_first
        await _pass_equals_reference(pair, source)  # type: ignore[arg-type]
        await asyncio.gather(*pair.tasks)
        assert pair.a.counters["frames_forged"] == 2
        assert pair.a.counters["results_unexpected"] == 0 and pair.a.counters["frames_refused"] == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_pass_ids_are_random_63_bit() -> None:
    ids = [new_pass_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(0 < i < 2**63 for i in ids)
    assert sum(i > 2**48 for i in ids) > 990  # not a small counter


def test_the_broadcaster_sends_the_derived_key_in_prepare() -> None:
    _, actions = broadcast.run(broadcast.start(3), broadcast.request())
    prepare = actions[1].message
    assert isinstance(prepare, PrepareEpoch)
    assert parse_frame_key(prepare.frame_key) == derive_frame_key(broadcast.KEY, 4, prepare.plan.signature)


def test_frame_keys_differ_per_epoch_plan_and_secret_and_travel_in_prepare() -> None:
    plan = make_plan(3, "a", [("a", 0, 2), ("b", 2, 4)], "secret-1")
    key = derive_frame_key("secret-1", 3, plan.signature)
    assert len(key) == 32
    assert key != derive_frame_key("secret-2", 3, plan.signature)
    assert key != derive_frame_key("secret-1", 4, plan.signature)
    other = make_plan(3, "b", [("b", 0, 2), ("a", 2, 4)], "secret-1")
    assert key != derive_frame_key("secret-1", 3, other.signature)
    prepare = PrepareEpoch(epoch=3, plan=plan, frame_key=key.hex())
    assert parse_frame_key(PrepareEpoch.model_validate_json(prepare.model_dump_json()).frame_key) == key
    with pytest.raises(ConfigError, match="no plan-signing secret"):
        derive_frame_key("", 3, plan.signature)
    with pytest.raises(ConfigError, match="31 bytes"):
        parse_frame_key("ab" * 31)
    assert isinstance(ActivationHeader.model_fields["mac"].default, bytes)
    assert KvHeader.model_fields["src"].default is None and ROUTE.entry == "a"


def test_pair_keys_are_directional_per_epoch_and_follow_a_new_announcement() -> None:
    """The pair key both ends compute is the same; it differs per direction, per epoch and
    per pair; a re-announced key (the node restarted) replaces the old one."""

    async def main() -> None:
        a, b = PeerKeys("a"), PeerKeys("b")
        assert a.key(KEY, "a", "b") is None  # b has announced nothing yet
        waiting = asyncio.ensure_future(a.wait_for("b", 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert a.learn("b", b.public_hex) and b.learn("a", a.public_hex)
        assert await waiting
        assert not await PeerKeys("x").wait_for("nobody", 0.05)
        forward = a.key(KEY, "a", "b")
        assert forward is not None and forward == b.key(KEY, "a", "b")
        assert forward != a.key(KEY, "b", "a") and forward != a.key(KEY_2, "a", "b")
        assert not a.learn("b", "zz" * 32) and a.key(KEY, "a", "b") == forward  # garbage changes nothing
        assert not a.learn("a", PeerKeys("a").public_hex) and a.key(KEY, "a", "a") == a.key(KEY, "a", "a")
        restarted = PeerKeys("b")
        assert a.learn("b", restarted.public_hex) and restarted.learn("a", a.public_hex)
        assert a.key(KEY, "a", "b") == restarted.key(KEY, "a", "b") != forward

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_frame_that_overtakes_its_senders_announcement_waits_for_it(make_pair: Callable[[], Pair]) -> None:  # noqa: F811
    """A frame from the plan's sender whose key has not arrived yet waits (up to
    `KEY_WAIT_S`) for the announcement instead of being dropped."""

    async def main() -> None:
        pair = make_pair()
        b_keys = PeerKeys("b")  # b has just started: it has seen no status yet
        pair.b.auth.peers = b_keys
        a_keys = PeerKeys("a")
        a_keys.learn("b", b_keys.public_hex)
        header = _activation(step=1).model_copy(update={"src": "a"})
        frame = Frame(*decode_frame(encode_frame(header, _row(1), a_keys.key(KEY, "a", "b"))))
        delivered = asyncio.ensure_future(pair.b.on_frame(frame))
        await asyncio.sleep(0.1)
        assert not delivered.done()
        b_keys.learn("a", a_keys.public_hex)  # a's status arrives
        await delivered
        assert pair.host_b.requests() == 1 and pair.b.counters["frames_forged"] == 0

    asyncio.run(asyncio.wait_for(main(), 60))
