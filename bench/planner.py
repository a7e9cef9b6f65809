"""Planner benchmark: solve time and optimality gap by size.

    .venv/bin/python bench/planner.py [--sizes 4,8,16,32,64] [--layers 32,80]
                                      [--instances 3] [--repeats 3]

Instances are random but seeded and shaped like the project's deployments: a trusted
source (a car or a gateway) holding the first blocks, heterogeneous nodes (speed,
memory, load, trust), and a sparse link graph (each node linked both ways to about
four others; the source to about six). For each size it prints the exact method's time
(where the exact range allows), the fast method's time, and the fast method's gap to
the exact optimum or, beyond the exact range, to the relaxation's lower bound.
Times are medians over instances x repeats; gaps are the worst over instances.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.planning.objectives import build_tables  # noqa: E402
from shared.planning.problem import Problem, parse_problem  # noqa: E402
from shared.planning.solver import solve, usable_nodes  # noqa: E402
from shared.planning.solver_fast import lower_bound  # noqa: E402

EXACT_MAX_NODES = 12


def instance(num_nodes: int, num_layers: int, seed: int, objective: str) -> Problem:
    """A seeded deployment-like problem (SmolLM2-sized blocks, fp32 weights)."""
    rng = random.Random(seed * 1009 + num_nodes * 31 + num_layers)
    layer_bytes = 14_155_776.0
    layers = [{"flops": 9.0e6 * rng.uniform(0.9, 1.1), "weight_bytes": layer_bytes,
               "kv_bytes_per_token": 768, "out_bytes": 2304,
               "min_trust": 2 if index < 2 else 0} for index in range(num_layers)]
    per_layer = layer_bytes + 768 * 512 * 2
    nodes = [{"id": "src", "trust": 2, "memory_bytes": 3 * per_layer,
              "flops_per_s": 2e9, "utilization": 0.1}]
    for index in range(1, num_nodes):
        nodes.append({
            "id": f"n{index:02d}", "trust": rng.choice((0, 0, 1, 2)),
            "memory_bytes": float(rng.randint(max(2, 2 * num_layers // num_nodes),
                                              max(3, num_layers // 2)) * per_layer),
            "flops_per_s": 10 ** rng.uniform(9, 10.7),
            "utilization": 1.0 if rng.random() < 0.1 else round(rng.uniform(0, 0.9), 2),
        })
    pairs = set()
    for index in range(1, num_nodes):
        for other in rng.sample(range(num_nodes), min(num_nodes, 3)):
            if other != index:
                pairs |= {(index, other), (other, index)}
    for other in rng.sample(range(1, num_nodes), min(num_nodes - 1, 6)):
        pairs |= {(0, other), (other, 0)}
    links = [{"src": nodes[a]["id"], "dst": nodes[b]["id"],
              "bandwidth_bytes_per_s": 10 ** rng.uniform(6, 9),
              "latency_s": rng.uniform(0.0005, 0.02)} for a, b in sorted(pairs)]
    return parse_problem({"objective": objective, "source": "src", "input_bytes": 2304,
                          "context_tokens": 512, "concurrent_requests": 2,
                          "layers": layers, "nodes": nodes, "links": links})


def _timed(problem: Problem, method: str, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = solve(problem, method=method, time_limit_s=60.0)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def _primary(result) -> float:
    if result.objective == "latency":
        return result.predicted.latency_s
    return result.predicted.bottleneck_s


def measure(num_nodes: int, num_layers: int, objective: str, args) -> dict:
    exact_times, fast_times, gaps_exact, gaps_bound, usable = [], [], [], [], []
    for seed in range(args.instances):
        problem = instance(num_nodes, num_layers, seed, objective)
        tables = build_tables(problem)
        usable.append(len(usable_nodes(tables)))
        fast_s, fast = _timed(problem, "fast", args.repeats)
        fast_times.append(fast_s)
        bound = lower_bound(tables, objective)
        if fast.feasible and bound is not None:
            gaps_bound.append(_primary(fast) / bound.value - 1)
        if usable[-1] <= EXACT_MAX_NODES:
            exact_s, exact = _timed(problem, "exact", args.repeats)
            exact_times.append(exact_s)
            if exact.feasible and fast.feasible:
                gaps_exact.append(_primary(fast) / _primary(exact) - 1)
    return {"usable": max(usable), "exact": exact_times, "fast": fast_times,
            "gap_exact": gaps_exact, "gap_bound": gaps_bound}


def _fmt_time(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.1f}" if values else "       -"


def _fmt_gap(values: list[float]) -> str:
    return f"{max(values) * 100:8.3f}%" if values else "        -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,8,16,32,64")
    parser.add_argument("--layers", default="32,80")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("objective   nodes layers usable  exact_ms  fast_ms  gap_vs_exact  gap_vs_bound")
    for objective in ("latency", "throughput"):
        for num_layers in (int(x) for x in args.layers.split(",")):
            for num_nodes in (int(x) for x in args.sizes.split(",")):
                row = measure(num_nodes, num_layers, objective, args)
                print(f"{objective:<11} {num_nodes:5d} {num_layers:6d} {row['usable']:6d} "
                      f"{_fmt_time(row['exact'])} {_fmt_time(row['fast'])}    "
                      f"{_fmt_gap(row['gap_exact'])}     {_fmt_gap(row['gap_bound'])}",
                      flush=True)


if __name__ == "__main__":
    main()
