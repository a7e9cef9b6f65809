"""Seeded random planning instances and an independent brute-force optimiser (tests only).

The brute force shares no code with the planner: it enumerates every node sequence and
every composition of the layers into that many non-empty segments (with early pruning
of segments that break memory, trust or links), and scores them from cost-model.md.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

TRUSTS = (0, 0, 1, 2)
UTILIZATIONS = (0.0, 0.0, 0.1, 0.5, 0.9, 1.0, 1.5)


def random_problem(rng: random.Random, max_nodes: int = 6, max_layers: int = 10) -> dict:
    """A small problem dict: mixed trust, tight memory, missing links, busy nodes."""
    num_nodes = rng.randint(1, max_nodes)
    num_layers = rng.randint(1, max_layers)
    context, concurrent = rng.choice((0, 16, 256)), rng.randint(1, 2)
    layers = []
    for index in range(num_layers):
        layer = {
            "flops": float(rng.randint(1, 50) * 1_000_000),
            "weight_bytes": float(rng.randint(1, 20) * 50_000),
            "kv_bytes_per_token": rng.choice((0, 256, 512)),
            "out_bytes": rng.choice((512, 2304, 4096)),
            "min_trust": 2 if index == 0 and rng.random() < 0.5 else rng.choice((0, 0, 0, 1)),
        }
        if rng.random() < 0.2:
            layer["preferred_trust"] = rng.choice((1, 2))
        layers.append(layer)
    need = sum(lay["weight_bytes"] + lay["kv_bytes_per_token"] * context * concurrent for lay in layers)
    names = rng.sample(["car", "rsu", "mec", "cam", "gw", "edge", "bus", "pole"], num_nodes)
    nodes = [{
        "id": name,
        "trust": rng.choice(TRUSTS) if position else rng.choice((1, 2, 2)),
        "memory_bytes": float(rng.randint(0, 10) * need // rng.randint(3, 8)),
        "flops_per_s": float(rng.randint(1, 20) * 1e9),
        "utilization": rng.choice(UTILIZATIONS),
    } for position, name in enumerate(names)]
    density = rng.choice((0.3, 0.6, 0.9, 1.0))
    links = [{
        "src": a["id"], "dst": b["id"],
        "bandwidth_bytes_per_s": float(rng.choice((2e5, 1e6, 1e7, 1e8))),
        "latency_s": rng.choice((0.0, 0.001, 0.002, 0.01)),
    } for a in nodes for b in nodes if a is not b and rng.random() < density]
    return {
        "objective": rng.choice(("latency", "throughput")),
        "source": names[0], "input_bytes": rng.choice((512, 2304)),
        "context_tokens": context, "concurrent_requests": concurrent,
        "layers": layers, "nodes": nodes, "links": links,
    }


@dataclass
class BruteForce:
    """Best values over every feasible plan (None when there is none)."""

    best_latency: float | None = None
    best_throughput: tuple[float, float] | None = None  # (bottleneck, latency)
    count: int = 0


def brute_force(data: dict) -> BruteForce:
    """Enumerate every plan of a problem dict and keep both objectives' optima."""
    layers, nodes = data["layers"], {n["id"]: n for n in data["nodes"]}
    links = {(link["src"], link["dst"]): link for link in data["links"]}
    tokens = data.get("context_tokens", 0) * data.get("concurrent_requests", 1)
    num_layers, source = len(layers), data["source"]
    out = BruteForce()
    if nodes[source]["trust"] < data.get("source_min_trust", 0):
        return out

    def hop(a: str, b: str, size: float) -> float | None:
        if a == b:
            return 0.0
        link = links.get((a, b))
        return None if link is None else link["latency_s"] + size / link["bandwidth_bytes_per_s"]

    def fits(name: str, start: int, end: int) -> bool:
        node = nodes[name]
        chunk = layers[start:end]
        memory = math.fsum(lay["weight_bytes"] + lay["kv_bytes_per_token"] * tokens for lay in chunk)
        return (node.get("utilization", 0) < 1 and memory <= node["memory_bytes"]
                and all(node["trust"] >= lay.get("min_trust", 0) for lay in chunk))

    def record(terms: list[float]) -> None:
        latency, bottleneck = math.fsum(terms), max(terms)
        out.count += 1
        if out.best_latency is None or latency < out.best_latency:
            out.best_latency = latency
        if out.best_throughput is None or (bottleneck, latency) < out.best_throughput:
            out.best_throughput = (bottleneck, latency)

    def extend(start: int, previous: str, used: frozenset, terms: list[float]) -> None:
        if start == num_layers:
            back = hop(previous, source, layers[-1]["out_bytes"])
            if back is not None:
                record(terms + [back])
            return
        size = data["input_bytes"] if start == 0 else layers[start - 1]["out_bytes"]
        for name in nodes:
            step = None if name in used else hop(previous, name, size)
            if step is None:
                continue
            node = nodes[name]
            for end in range(start + 1, num_layers + 1):
                if not fits(name, start, end):
                    break  # memory and trust only get worse with more layers
                speed = node["flops_per_s"] * (1.0 - node.get("utilization", 0))
                compute = math.fsum(lay["flops"] for lay in layers[start:end]) / speed
                batch, scaling = data.get("expected_batch") or 1, node.get("batch_scaling")
                if scaling is not None:  # one request's share of a batch of `batch` steps
                    compute *= (1 + scaling * (batch - 1)) / batch
                extend(end, name, used | {name}, terms + [step, compute])

    extend(0, source, frozenset(), [])
    return out
