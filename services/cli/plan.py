"""``edgesplit plan PROBLEM.json``: the split reviser's solver on an offline problem.

``--json`` prints one object exactly as cost-model.md shows it; without it, a table of
segments and hops and the same numbers. An infeasible problem is an answer
(``{"feasible": false, "reason": ...}``, exit 0); a malformed or missing file is a user
error (one line naming the field, exit 1).
"""

from __future__ import annotations

import argparse
import json
import math

from shared.planning.problem import (
    Problem,
    boundary_bytes,
    compute_s,
    load_problem,
    transfer_s,
)
from shared.planning.solver import PlanResult, solve


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds: {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` sub-command."""
    parser = subparsers.add_parser(
        "plan",
        help="solve a placement-partitioning problem file",
        description="Choose nodes, their order and the split points for a problem file "
        "(see docs/PLANNER.md). Infeasible problems print the reason and exit 0.",
    )
    parser.add_argument("problem", metavar="PROBLEM.json", help="the problem file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--objective", choices=("latency", "throughput"),
                        help="override the file's objective")
    parser.add_argument("--time-limit-s", type=_positive_seconds, default=1.0,
                        help="time budget for choosing the method (default 1.0 s)")
    parser.add_argument("--method", choices=("auto", "exact", "fast"), default="auto",
                        help="exact subset DP, fast candidate DP, or auto (default)")
    parser.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Handler: load, solve, print. Raises ProblemFieldError for a bad file."""
    problem = load_problem(args.problem)
    if args.objective:
        problem = problem.model_copy(update={"objective": args.objective})
    result = solve(problem, method=args.method, time_limit_s=args.time_limit_s)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_table(problem, result))
    return 0


def format_table(problem: Problem, result: PlanResult) -> str:
    """A readable plan: one row per segment and hop, then the predicted numbers."""
    if not result.feasible:
        return f"infeasible: {result.reason}"
    proof = "optimal" if result.optimal else "best found"
    lines = [f"objective {result.objective}, method {result.method} ({proof})"]
    if result.lower_bound is not None:
        lines.append(f"lower bound on the objective: {result.lower_bound:.9g} s")
    chosen = result.precision is not None
    extra = f" {'weights':>8} {'hop_in':>7}" if chosen else ""
    lines.append(f"{'#':>2}  {'node':<16} {'layers':<12} {'compute_s':>12} {'hop_in_s':>12}{extra}")
    nodes, links = problem.node_index(), problem.link_index()
    previous = problem.source
    for index, seg in enumerate(result.segments):
        node = nodes[seg.node]
        flops = math.fsum(layer.flops for layer in problem.layers[seg.start : seg.end])
        compute = compute_s(problem, node, flops)  # its share of a batch at expected_batch
        hop = _hop(problem, links, previous, seg.node, seg.start, seg.activations)
        extra = f" {seg.weights:>8} {seg.activations if previous != seg.node else '-':>7}" if chosen else ""
        lines.append(f"{index:>2}  {seg.node:<16} {f'[{seg.start}, {seg.end})':<12} "
                     f"{compute:>12.6g} {hop:>12.6g}{extra}")
        previous = seg.node
    back = _hop(problem, links, previous, problem.source, len(problem.layers), result.return_activations)
    at = f" ({result.return_activations})" if chosen and previous != problem.source else ""
    lines.append(f"    return {previous} -> {problem.source}: {back:.6g} s{at}")
    assert result.predicted is not None
    lines.append(f"latency_s {result.predicted.latency_s:.9g}  "
                 f"bottleneck_s {result.predicted.bottleneck_s:.9g}")
    if result.precision is not None:
        lines += _savings(result.precision)
    return "\n".join(lines)


def _savings(summary: dict) -> list[str]:
    """The precision choices' savings: per compressed hop, then the totals."""
    lines = []
    for hop in summary["hops"]:
        if hop["activations"] != "fp32":
            lines.append(f"link {hop['src']} -> {hop['dst']} (before layer {hop['before_layer']}): "
                         f"{hop['activations']}, {hop['bytes_per_token']:.0f} of "
                         f"{hop['fp32_bytes_per_token']:.0f} bytes per token, "
                         f"{hop['saved_s']:.6g} s per token saved")  # fmt: skip
    for seg in summary["segments"]:
        if seg["weights"] != "fp32":
            lines.append(f"weights {seg['node']} [{seg['start']}, {seg['end']}): {seg['weights']}, "
                         f"{seg['weight_bytes']:.0f} of {seg['fp32_weight_bytes']:.0f} bytes held")  # fmt: skip
    lines.append(f"precision saves {summary['link_saved_s']:.6g} s per token on links and "
                 f"{summary['memory_saved_bytes']:.0f} bytes of weights; quality loss "
                 f"{summary['quality_loss']:.4g} of budget {summary['quality_budget']:.4g}")  # fmt: skip
    return lines


def _hop(problem: Problem, links: dict, src: str, dst: str, boundary: int, precision: str = "fp32") -> float:
    if src == dst:
        return 0.0
    return transfer_s(links[(src, dst)], boundary_bytes(problem, boundary, precision))
