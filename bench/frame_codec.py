"""Per-frame CPU cost of tensor frames: header build, encode and decode (us), no broker.

Times are this process's CPU time (``time.process_time``, so other processes on a busy
machine matter less), the best of ``--repeats`` timeit rounds.

The frame is a decode step's activation (float32 [1, hidden]) with the header a worker
forwards (`services/worker/dataplane.py` `_send`); then a result and a small probe; then
the cost of authenticating a frame (HMAC-SHA256 under the epoch key, `frame_auth.py`):
sealing on encode and verifying, for a decode row and a 2048-token prefill.

    .venv/bin/python -m bench.frame_codec [--number 50000] [--repeats 7] [--hidden 576]
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable

import numpy as np

from shared.frame_headers import ActivationHeader, FrameHeader, ProbeHeader, ResultHeader
from shared.ids import NodeId, RequestId
from shared.tensor_frame import decode_frame, encode_frame, mac_ok

KEY = bytes(range(32))


def activation() -> ActivationHeader:
    """The header of one forwarded decode step (built per hop, as the data plane does)."""
    return ActivationHeader(request_id=RequestId("r1"), step=17, epoch=3, seq=42, src=NodeId("mec"),
                            sent_at=time.time(), target=8, pos=17, last_only=True, pass_id=5)  # fmt: skip


def result() -> ResultHeader:
    return ResultHeader(request_id=RequestId("r1"), step=17, epoch=3, seq=43, src=NodeId("mec"),
                        sent_at=time.time(), pass_id=5)  # fmt: skip


def probe() -> ProbeHeader:
    return ProbeHeader(request_id=RequestId("probe"), step=0, epoch=0, seq=7, role="ping",
                       src=NodeId("car"))  # fmt: skip


def best_us(function: Callable[[], object], number: int, repeats: int) -> float:
    """Best per-call CPU time of ``function`` over ``repeats`` rounds of ``number`` calls (us)."""
    rounds = timeit.repeat(function, number=number, repeat=repeats, timer=time.process_time)
    return min(rounds) / number * 1e6


def measure(build: Callable[[], FrameHeader], array: np.ndarray, number: int, repeats: int) -> str:
    header = build()
    payload = encode_frame(header, array)
    if decode_frame(payload)[0] != header:
        raise RuntimeError(f"{header.kind} header did not round-trip")
    build_us = best_us(build, number, repeats)
    encode_us = best_us(lambda: encode_frame(header, array), number, repeats)
    decode_us = best_us(lambda: decode_frame(payload), number, repeats)
    return (f"{header.kind:10} {len(payload) - array.nbytes:4} B header  build {build_us:6.2f}  "
            f"encode {encode_us:6.2f}  decode {decode_us:6.2f}  encode+decode "
            f"{encode_us + decode_us:6.2f}  all {build_us + encode_us + decode_us:6.2f} us")  # fmt: skip


def measure_mac(array: np.ndarray, number: int, repeats: int) -> str:
    """Sealed encode and MAC verification of one activation carrying ``array``."""
    header = activation()
    sealed = decode_frame(encode_frame(header, array, KEY))
    if not mac_ok(KEY, *sealed):
        raise RuntimeError("a sealed frame did not verify")
    plain_us = best_us(lambda: encode_frame(header, array), number, repeats)
    seal_us = best_us(lambda: encode_frame(header, array, KEY), number, repeats)
    verify_us = best_us(lambda: mac_ok(KEY, *sealed), number, repeats)
    return (f"mac {'x'.join(map(str, array.shape)):>9} ({array.nbytes:8} B)  encode {plain_us:8.2f}  "
            f"sealed encode {seal_us:8.2f} (+{seal_us - plain_us:8.2f})  verify {verify_us:8.2f} us")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=50_000, help="calls per timeit round")
    parser.add_argument("--repeats", type=int, default=7, help="timeit rounds (the best counts)")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    args = parser.parse_args()
    hidden_state = np.random.default_rng(0).standard_normal((1, args.hidden), dtype=np.float32)
    padding = np.zeros(64, np.uint8)  # a small probe
    print(measure(activation, hidden_state, args.number, args.repeats))
    print(measure(result, hidden_state, args.number, args.repeats))
    print(measure(probe, padding, args.number, args.repeats))
    print(measure_mac(hidden_state, args.number // 5, args.repeats))
    prefill = np.random.default_rng(1).standard_normal((2048, args.hidden), dtype=np.float32)
    print(measure_mac(prefill, max(1, args.number // 5000), args.repeats))


if __name__ == "__main__":
    main()
