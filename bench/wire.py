"""Round-trip times through the bus: publish a frame, receive it back, p50/p99.

Starts its own Mosquitto (shared.broker.start_local_broker). One process publishes on
the data connection and receives its own frame back through the broker, so each
sample is publish + broker + delivery + decode. A control-message row (TokenGenerated
over the control connection) is included for comparison.

    .venv/bin/python -m bench.wire [--samples 200] [--loop uvloop] [--protocol 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from shared.broker import start_local_broker
from shared.bus import Bus
from shared.config import BusSettings
from shared.frame_headers import ActivationHeader
from shared.ids import request_id
from shared.messages import TokenGenerated
from shared.topics import ACTIVATIONS, REPLIES

BENCH_REQUEST = request_id("bench")
SIZES_BYTES = {"64 B": 64, "2.3 KB": 2304, "300 KB": 294_912, "1 MB": 1 << 20}


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def frame_round_trips(bus: Bus, size_bytes: int, samples: int) -> list[float]:
    """Seconds per round trip of a float32 frame of ``size_bytes`` tensor bytes."""
    tensor = np.random.default_rng(0).standard_normal(size_bytes // 4, dtype=np.float32)
    times: list[float] = []
    async with bus.subscribe(ACTIVATIONS, node="bench") as frames:
        for seq in range(samples + 10):  # 10 warm-up rounds
            header = ActivationHeader(request_id=BENCH_REQUEST, step=seq, epoch=0, seq=seq, target=0,
                                      pos=seq, last_only=False, pass_id=seq)  # fmt: skip
            start = time.perf_counter()
            await bus.publish_frame(ACTIVATIONS, header, tensor, node="bench")
            delivery = await frames.get()
            elapsed = time.perf_counter() - start
            if delivery.message.header.seq != seq:
                raise RuntimeError(f"frame {seq} came back as {delivery.message.header.seq}")
            if seq >= 10:
                times.append(elapsed)
    return times


async def control_round_trips(bus: Bus, samples: int) -> list[float]:
    times: list[float] = []
    async with bus.subscribe(REPLIES, client="bench") as replies:
        for index in range(samples + 10):
            token = TokenGenerated(request_id=BENCH_REQUEST, index=index, token_id=42, text=" x")
            start = time.perf_counter()
            await bus.publish(REPLIES, token, client="bench")
            await replies.get()
            if index >= 10:
                times.append(time.perf_counter() - start)
    return times


async def measure(url: str, protocol: str, samples: int) -> list[tuple[str, list[float]]]:
    settings = BusSettings(broker_url=url, cluster="bench", protocol=protocol)  # type: ignore[arg-type]
    rows: list[tuple[str, list[float]]] = []
    async with asyncio.timeout(600), Bus(settings, origin="bench") as bus:
        rows.append(("control msg (QoS 1)", await control_round_trips(bus, samples)))
        for label, size in SIZES_BYTES.items():
            rows.append((f"frame {label}", await frame_round_trips(bus, size, samples)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    args = parser.parse_args()
    with start_local_broker() as broker:
        coroutine = measure(broker.url, args.protocol, args.samples)
        if args.loop == "uvloop":
            import uvloop

            rows = uvloop.run(coroutine)
        else:
            rows = asyncio.run(coroutine)
    print(f"round trip through Mosquitto, MQTT {args.protocol}, {args.loop}, {args.samples} samples")
    print(f"{'payload':<22}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}")
    for label, times in rows:
        p50, p99 = percentile(times, 0.5) * 1e3, percentile(times, 0.99) * 1e3
        print(f"{label:<22}{p50:>9.3f}{p99:>9.3f}{statistics.fmean(times) * 1e3:>9.3f}")


if __name__ == "__main__":
    main()
