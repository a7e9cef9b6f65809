"""How far CPU load moves probe RTTs on idle links, and what the monitor's rtt detector makes of it.

Starts its own Mosquitto and three real workers (a tiny llama shard store in a temporary
folder) on the links of the noise acceptance test (tests/integration/test_monitor.py:
a<->b 1 MB/s, a<->c 2 MB/s, b<->c 0.5 MB/s, 5 ms each way), turns on +-10 % emulation
noise after 15 s, records every worker's telemetry for ``--seconds`` and replays the rtt
samples through the monitor's detector (services/monitor/detect.py). With ``--hogs N``
N busy-looping processes run for 15 s out of every 40 s, from 35 s on.

It prints, per directed link, the rtt quantiles, then for the detector as it is
configured and for the median-based one it replaced: the largest rise of the judged
value over its baseline and the LinkDegraded(rtt) events it would have raised.

    .venv/bin/python -m bench.monitor_jitter [--seconds 150] [--hogs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from services.monitor.detect import MonitorConfig, TrackedMetric
from shared.broker import start_local_broker
from shared.bus import Bus
from shared.config import BusSettings
from shared.messages import EmulationCommand
from shared.model.shard import write_shards
from shared.model.tiny import write_tiny_checkpoint
from shared.topics import EMULATION, TELEMETRY

MB = 1e6
LINKS = {("a", "b"): 1 * MB, ("b", "a"): 1 * MB, ("a", "c"): 2 * MB, ("c", "a"): 2 * MB,
         ("b", "c"): 0.5 * MB, ("c", "b"): 0.5 * MB}  # fmt: skip
Sample = tuple[float, str, str, float]  # (Unix s, node, peer, rtt s)


async def record(url: str, cluster: str, seconds: float) -> list[Sample]:
    settings = BusSettings(broker_url=url, cluster=cluster)  # type: ignore[arg-type]
    samples: list[Sample] = []
    async with Bus(settings) as bus, bus.subscribe(TELEMETRY) as telemetry:
        began, noisy = time.time(), False
        async with asyncio.timeout(seconds + 30):
            async for _, message in telemetry:
                now_s = time.time()
                if not noisy and now_s - began > 15:
                    for index, node in enumerate("abc"):
                        await bus.publish(EMULATION, EmulationCommand(command_id=100 + index, noise=0.1), node=node)
                    noisy = True
                samples += [(now_s, message.node, link.peer, link.rtt_s) for link in message.links
                            if link.rtt_s is not None]  # fmt: skip
                if now_s - began > seconds:
                    return samples
    return samples


def replay(samples: list[Sample], config: MonitorConfig, median: bool) -> tuple[float, list[str]]:
    """(largest rise of the judged rtt over its baseline in s, events) through the detector."""
    metrics: dict[tuple[str, str], TrackedMetric] = {}
    largest, events = 0.0, []
    for at_s, node, peer, rtt_s in samples:
        metric = metrics.setdefault((node, peer), TrackedMetric("rtt", config))
        if median:
            metric.judged = metric.value  # type: ignore[method-assign]
        change = metric.add(at_s, rtt_s)
        judged = metric.judged(at_s)
        if metric.baseline is not None and judged is not None:
            largest = max(largest, judged - metric.baseline)
        if change is not None:
            evidence = change.evidence
            events.append(f"{node}->{peer} {change.transition} at {(evidence.new_value or 0) * 1e3:.1f} ms "
                          f"(threshold {(evidence.threshold or 0) * 1e3:.1f} ms)")  # fmt: skip
    return largest, events


def hog(hogs: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    """Busy loops: 15 s on, 25 s off, from 35 s on (killed when the recording ends)."""
    script = "import time\ntime.sleep(35)\nwhile True:\n    end = time.time() + 15\n" \
             "    while time.time() < end: pass\n    time.sleep(25)\n"  # fmt: skip
    return [subprocess.Popen([sys.executable, "-c", script]) for _ in range(hogs)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--hogs", type=int, default=0, help="busy-looping processes, 15 s of every 40 s")
    args = parser.parse_args()
    broker = start_local_broker()
    workers: list[subprocess.Popen[bytes]] = []
    hogs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as folder:
        shards = Path(folder) / "shards"
        write_shards(write_tiny_checkpoint("llama", Path(folder) / "model"), shards)
        try:
            for node in "abc":
                shapes = {dst: [capacity, 0.005] for (src, dst), capacity in LINKS.items() if src == node}
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "services.worker", "--node-id", node, "--shards", str(shards),
                     "--broker", broker.url, "--cluster", "jitter", "--threads", "1",
                     "--links", json.dumps(shapes), "--log-level", "WARNING"]))  # fmt: skip
            hogs = hog(args.hogs, args.seconds)
            samples = asyncio.run(record(broker.url, "jitter", args.seconds))
        finally:
            for process in hogs + workers:
                process.terminate()
            for process in hogs + workers:
                process.wait(timeout=10)
            broker.close()
    by_link: dict[tuple[str, str], list[float]] = defaultdict(list)
    for _, node, peer, rtt_s in samples:
        by_link[(node, peer)].append(rtt_s * 1e3)
    for (node, peer), rtts in sorted(by_link.items()):
        q = statistics.quantiles(rtts, n=20)
        print(f"{node}->{peer}: {len(rtts)} samples, rtt ms min {min(rtts):.1f} p5 {q[0]:.1f} "
              f"median {statistics.median(rtts):.1f} p95 {q[-1]:.1f} max {max(rtts):.1f}")  # fmt: skip
    detectors = [("lower quartile, +20 ms (as configured)", MonitorConfig(), False),
                 ("median, +10 ms (before)", MonitorConfig(rtt_min_rise_s=0.01, min_samples=3), True)]  # fmt: skip
    for name, config, median in detectors:
        largest, events = replay(samples, config, median)
        print(f"{name}: largest rise {largest * 1e3:.1f} ms; events: {events or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
