"""How many nodes one Mosquitto carries here: messages/s and latency as simulated nodes grow.

Starts its own Mosquitto (deploy/mosquitto/mosquitto.conf, as `up` runs it) and, for
each node count N, simulates N workers in a ring: node i publishes decode-sized
activation frames (2,304 B, SmolLM2's hidden state, QoS 0 on
``edgesplit/bench/nodes/{i+1}/activations``) at ``--rate`` per second, plus one small
telemetry message per second (QoS 0), and receives its predecessor's. Each node is its own
MQTT connection for sending (paho, TCP_NODELAY as the bus sets it); each load process
receives for its nodes on one connection, and the nodes are spread over ``--procs`` load
processes, so the Python side costs as little as it can. Every payload carries
its send time; the receiver computes the latency (same host clock).

Per N it prints offered and delivered messages/s, loss, p50 and p99 latency, and the
broker's CPU share (from /proc). Saturation: delivered under 95 % of offered, or p99 over
``--p99-limit-ms``; it stops after the first saturated step (``--keep-going`` runs all).
The load processes share the machine with the broker: on a small box they may saturate
first; the CPU columns say which (1 core = 100 %; the broker is single-threaded, so
its limit is one core, the load processes' is the machine's cores).

    .venv/bin/python -m bench.broker_capacity [--nodes 4,8,16,32,64,128,256] [--rate 50]
        [--seconds 5] [--procs 2] [--broker-cpus 0.25,0.5 [--cpu-period-ms 10]]

``--broker-cpus`` runs the whole sweep once per value with the broker (a fresh one each
time) under that CPU quota (bench/cpu_quota.py: cgroup v2 cpu.max, or v1's CFS quota;
root only), so the broker saturates before the load processes do on a small machine; the
"throttled" column is the share of the quota's periods in which the kernel stopped the
broker because its quota ran out (near 100 %: the quota is the limit).

A token through a pipeline of k hops costs k activation frames plus one reply, so
tokens/s carried is about delivered / (k + 1) (the table shows k = 3).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from bench.cpu_quota import CpuQuota, QuotaUnavailable, Throttling
from shared.broker import start_local_broker

FRAME_BYTES = 2304
TELEMETRY_BYTES = 200
_STAMP = struct.Struct("!dI")  # send time (s), sender index


@dataclass(frozen=True)
class Step:
    nodes: int
    offered_per_s: float
    delivered_per_s: float
    loss: float
    p50_ms: float
    p99_ms: float
    broker_cpu: float
    load_cpu: float
    """CPU of the load processes together (1.0 = one core), over the step."""
    throttled: float | None = None
    """Share of the broker's quota periods that ran out of quota (None: no quota)."""


def _nodelay(client: mqtt.Client) -> None:
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _publisher(port: int, name: str) -> mqtt.Client:
    """A node's sending connection, driven by the caller's thread (no loop thread)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    client.connect("127.0.0.1", port, keepalive=60)
    deadline = time.monotonic() + 10
    while not client.is_connected():
        client.loop(timeout=0.05)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: no CONNACK from the broker in 10 s")
    _nodelay(client)
    return client


def _receiver(port: int, name: str, topics: list[str], on_message: object) -> mqtt.Client:
    """One connection per load process subscribed to its nodes' topics (a loop thread)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    subscribed = threading.Event()
    client.on_message = on_message  # type: ignore[assignment]
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected():
        time.sleep(0.01)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: no CONNACK from the broker in 10 s")
    _nodelay(client)
    client.subscribe([(topic, 0) for topic in topics])
    if not subscribed.wait(10):
        raise RuntimeError(f"{name}: no SUBACK in 10 s")
    return client


def _load(port: int, nodes: range, total: int, rate: float, seconds: float, start_at: float,
          results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]  # fmt: skip
    """One load process: nodes ``nodes`` of a ring of ``total``, each with its own sending
    connection, and one receiving connection for all of them; puts (sent, latencies)."""
    latencies: list[float] = []

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        sent_at, _ = _STAMP.unpack_from(message.payload)
        latencies.append(time.time() - sent_at)

    topics = [f"edgesplit/bench/nodes/{node}/{kind}" for node in nodes for kind in ("activations", "telemetry")]
    receiver = _receiver(port, f"bench-{total}-rx{nodes.start}", topics, on_message)
    clients = [(node, _publisher(port, f"bench-{total}-{node}")) for node in nodes]
    time.sleep(max(0.0, start_at - time.time()))
    cpu_began = time.process_time()
    frame_pad = bytes(FRAME_BYTES - _STAMP.size)
    telemetry_pad = bytes(TELEMETRY_BYTES - _STAMP.size)
    interval = 1.0 / (rate * len(clients))
    sent, frames, began = 0, 0, time.monotonic()
    deadline = began + seconds
    next_tick = began
    while (now := time.monotonic()) < deadline:
        node, client = clients[frames % len(clients)]
        client.publish(f"edgesplit/bench/nodes/{(node + 1) % total}/activations",
                       _STAMP.pack(time.time(), node) + frame_pad, qos=0)  # fmt: skip
        client.loop_write()
        sent, frames = sent + 1, frames + 1
        if now >= next_tick:  # once a second: telemetry, and keepalive work for every connection
            for node, client in clients:
                client.publish(f"edgesplit/bench/nodes/{(node + 1) % total}/telemetry",
                               _STAMP.pack(time.time(), node) + telemetry_pad, qos=0)  # fmt: skip
                client.loop(timeout=0)
                sent += 1
            next_tick += 1.0
        wait = began + (frames + 1) * interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    for _, client in clients:
        client.loop(timeout=0)
    cpu_used = time.process_time() - cpu_began  # this process, every thread, over the window
    time.sleep(1.0)  # let the last messages arrive
    receiver.loop_stop()
    for _, client in [*clients, (0, receiver)]:
        client.disconnect()
    results.put((sent, latencies, cpu_used))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_step(port: int, broker_pid: int, nodes: int, rate: float, seconds: float, procs: int,
             quota: CpuQuota | None = None) -> Step:  # fmt: skip
    results: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 2.0 + nodes * 0.01  # every process connected and subscribed
    shares = [range(i, nodes, procs) for i in range(min(procs, nodes))]
    workers = [multiprocessing.Process(target=_load, args=(port, share, nodes, rate, seconds, start_at, results))
               for share in shares]  # fmt: skip
    for worker in workers:
        worker.start()
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before, wall_before = _cpu_seconds(broker_pid), time.monotonic()
    throttled_before = quota.throttling() if quota else None
    time.sleep(seconds)
    cpu = (_cpu_seconds(broker_pid) - cpu_before) / (time.monotonic() - wall_before)
    throttled: float | None = None
    if quota is not None and throttled_before is not None:
        window: Throttling = quota.throttling().since(throttled_before)
        throttled = window.throttled / window.periods if window.periods else 0.0
    sent, latencies, load_cpu_s = 0, [], 0.0
    for _ in workers:
        part_sent, part_latencies, part_cpu_s = results.get(timeout=120)
        sent += part_sent
        latencies += part_latencies
        load_cpu_s += part_cpu_s
    for worker in workers:
        worker.join(timeout=30)
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("inf")
    return Step(nodes=nodes, offered_per_s=sent / seconds, delivered_per_s=len(latencies) / seconds,
                loss=1 - len(latencies) / sent if sent else 0.0,
                p50_ms=statistics.median(latencies) * 1e3 if latencies else float("inf"),
                p99_ms=p99 * 1e3, broker_cpu=cpu, load_cpu=load_cpu_s / seconds, throttled=throttled)  # fmt: skip


def sweep(args: argparse.Namespace, counts: list[int], cores: float | None) -> None:
    """One broker (under ``cores`` of CPU when given), every node count; prints the table."""
    with tempfile.TemporaryDirectory(prefix="edgesplit-capacity-") as data_dir:
        broker = start_local_broker(data_dir=Path(data_dir))
        try:
            assert broker.process is not None
            quota = CpuQuota(broker.process.pid, cores, args.cpu_period_ms / 1e3) if cores else None
            limit = quota.describe() if quota else "no CPU quota"
            print(f"\n# Mosquitto {broker.url}, {os.cpu_count()} CPUs, {limit}; {args.rate:g} frames/s/node of "
                  f"{FRAME_BYTES} B + 1 telemetry/s, {args.seconds:g} s per step, {args.procs} load processes")
            print("| nodes | offered msg/s | delivered msg/s | loss | p50 ms | p99 ms | broker CPU | throttled "
                  "| load CPU | tokens/s (3 hops) |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            with quota if quota else contextlib.nullcontext():
                for nodes in counts:
                    step = run_step(broker.port, broker.process.pid, nodes, args.rate, args.seconds, args.procs,
                                    quota)  # fmt: skip
                    saturated = (step.delivered_per_s < 0.95 * step.offered_per_s
                                 or step.p99_ms > args.p99_limit_ms)  # fmt: skip
                    throttled = "-" if step.throttled is None else f"{step.throttled:.0%}"
                    print(f"| {nodes} | {step.offered_per_s:,.0f} | {step.delivered_per_s:,.0f} | {step.loss:.1%} | "
                          f"{step.p50_ms:.2f} | {step.p99_ms:.2f} | {step.broker_cpu:.0%} | {throttled} | "
                          f"{step.load_cpu:.0%} | {step.delivered_per_s / 4:,.0f} |{' saturated' if saturated else ''}",
                          flush=True)  # fmt: skip
                    if saturated and not args.keep_going:
                        break
        finally:
            broker.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_capacity", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", default="4,8,16,32,64,128,256")
    parser.add_argument("--rate", type=float, default=50.0, help="activation frames per node per s")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--procs", type=int, default=2, help="load processes")
    parser.add_argument("--p99-limit-ms", type=float, default=50.0)
    parser.add_argument("--keep-going", action="store_true")
    parser.add_argument("--broker-cpus", default="",
                        help="comma-separated CPU quotas for the broker, in cores (e.g. 0.25,0.5): one sweep each")
    parser.add_argument("--cpu-period-ms", type=float, default=10.0, help="the quota's period (default 10)")
    args = parser.parse_args(argv)
    try:
        counts = [int(n) for n in args.nodes.split(",")]
        quotas: list[float | None] = [float(c) for c in args.broker_cpus.split(",") if c.strip()] or [None]
    except ValueError:
        print(f"broker_capacity: --nodes {args.nodes!r} / --broker-cpus {args.broker_cpus!r}: expected "
              "comma-separated numbers", file=sys.stderr)  # fmt: skip
        return 2
    if any(n < 2 for n in counts) or args.rate <= 0 or args.seconds <= 0 or args.procs < 1:
        print("broker_capacity: --nodes >= 2 each, --rate, --seconds > 0, --procs >= 1", file=sys.stderr)
        return 2
    try:
        for cores in quotas:
            if cores is not None:
                CpuQuota(os.getpid(), cores, args.cpu_period_ms / 1e3)  # checks the values and the controller
        for cores in quotas:
            sweep(args, counts, cores)
    except QuotaUnavailable as error:
        print(f"broker_capacity: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
