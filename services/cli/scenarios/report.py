"""The scenario report: per-policy metrics (report.json), a readable summary (report.md)
and plots (PNG), from what the runner measured (docs/SCENARIOS.md defines every key).

Everything here is pure or synchronous file writing: the runner calls ``write_report`` off
the event loop (``asyncio.to_thread``), since plotting is CPU work.

Percentiles are nearest-rank: p-th percentile of n sorted samples is sample
``ceil(p / 100 * n)`` (1-based), so it is always a measured value. Times are reported in
milliseconds rounded to 0.001 ms, rates to 0.001 per second, fractions to 4 decimals.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.cli.scenarios.records import PolicyRun, Replan, RequestRecord
from services.cli.scenarios.report_md import render_markdown
from services.cli.scenarios.spec import Scenario, Slo

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def percentile(values: Iterable[float], p: float) -> float | None:
    """Nearest-rank ``p``-th percentile (0 < p <= 100); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _round(value: float | None, digits: int) -> float | None:
    """Rounded, and None for None or a value that is not finite (JSON has no NaN)."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else _round(seconds * 1000.0, 3)


def _rate(count: float, duration_s: float) -> float | None:
    return _round(count / duration_s, 3) if duration_s > 0 else None


def _spread_ms(samples_s: list[float]) -> dict[str, float | None]:
    return {f"p{p}": _ms(percentile(samples_s, p)) for p in (50, 95, 99)}


def meets_slo(request: RequestRecord, slo: Slo, kind: str) -> bool:
    """Completed and within every set target.

    TTFT is time to the first token (embed: to the embedding, i.e. the latency); a target
    that needs a number the request does not have is missed, except TPOT for a completion
    of fewer than two tokens (there is no time between tokens to exceed). Embed
    requests have no TPOT.
    """
    if request.outcome != "completed":
        return False
    ttft_s = request.latency_s if kind == "embed" else request.ttft_s
    checks = [(slo.ttft_s, ttft_s), (slo.latency_s, request.latency_s)]
    for target, measured in checks:
        if target is not None and (measured is None or measured > target):
            return False
    tpot_s = None if kind == "embed" else request.tpot_s
    return slo.tpot_s is None or tpot_s is None or tpot_s <= slo.tpot_s


def replan_entry(replan: Replan) -> dict[str, Any]:
    """One re-plan as report.json lists it (times of day in s, durations in ms)."""
    return {
        "at_s": _round(replan.at_s, 3),
        "kind": replan.kind,
        "trigger": replan.trigger,
        "reaction_s": _round(replan.reaction_s, 3),
        "stall_ms": _round(replan.stall_ms, 3),
        "bytes_moved": replan.bytes_moved,
        "epoch": replan.epoch,
        "layout": replan.layout,
        "cause": replan.cause,
        "predicted_tpot_ms": _ms(replan.predicted_tpot_s),
        "realised_tpot_ms": _ms(replan.realised_tpot_s),
    }


def request_counts(run: PolicyRun) -> dict[str, int]:
    """sent, completed, failed (a typed failure), lost (no terminal answer), mismatched."""
    outcomes = Counter(r.outcome for r in run.requests)
    return {"sent": len(run.requests), "completed": outcomes["completed"],
            "failed": outcomes["failed"], "lost": outcomes["lost"],
            "mismatched": sum(1 for r in run.requests if r.outcome == "completed" and r.mismatched)}  # fmt: skip


def quality(run: PolicyRun, kind: str) -> dict[str, Any]:
    """What the answers lost against the unsplit fp32 reference (a lossy precision's
    cost, reported beside the latency): over completed requests with a reference, the
    share equal to it and the mean / min agreement (generate: the share of the
    reference's tokens matched before the first difference; embed: cosine similarity)."""
    compared = [r for r in run.requests if r.outcome == "completed" and r.agreement is not None]
    scores = [r.agreement for r in compared if r.agreement is not None]
    return {"compared": len(compared),
            "exact_share": _round(sum(not r.mismatched for r in compared) / len(compared), 4) if compared else None,
            "agreement_mean": _round(math.fsum(scores) / len(scores), 6) if scores else None,
            "agreement_min": _round(min(scores), 6) if scores else None,
            "measure": "cosine" if kind == "embed" else "token prefix"}  # fmt: skip


def _reaction_summary(run: PolicyRun) -> dict[str, float | None]:
    reactions = [r.reaction_s for r in run.replans if r.reaction_s is not None]
    return {"p50": _round(percentile(reactions, 50), 3), "p95": _round(percentile(reactions, 95), 3),
            "max": _round(max(reactions), 3) if reactions else None}  # fmt: skip


def first_layout(run: PolicyRun) -> str | None:
    """The first plan the run served, e.g. ``gateway[0,1) edge1[1,6)`` (None without one)."""
    if not run.placements:
        return None
    epoch = min(p.epoch for p in run.placements)
    first = sorted((p for p in run.placements if p.epoch == epoch), key=lambda p: p.start)
    return " ".join(f"{p.node}[{p.start},{p.end})" for p in first)


def policy_metrics(run: PolicyRun, slo: Slo, kind: str) -> dict[str, Any]:
    """The per-policy metrics of report.json (``kind``: the workload, generate or embed).

    Latency and TTFT percentiles are over completed requests; TPOT over every request with
    two tokens or more, failed ones included (a request that streamed slowly and then
    timed out must not vanish from the TPOT it suffered); embed's ttft_ms equals its latency_ms
    and its tpot_ms and token rates are null. Rates divide by the run's measured duration.
    """
    embed = kind == "embed"
    done = [r for r in run.requests if r.outcome == "completed"]
    good = [r for r in done if meets_slo(r, slo, kind)]
    latencies = [s for s in (r.latency_s for r in done) if s is not None]
    ttfts = latencies if embed else [s for s in (r.ttft_s for r in done) if s is not None]
    tpots = [] if embed else [s for s in (r.tpot_s for r in run.requests) if s is not None]
    sent = len(run.requests)
    return {
        "requests": request_counts(run),
        "ttft_ms": _spread_ms(ttfts),
        "tpot_ms": _spread_ms(tpots),
        "latency_ms": _spread_ms(latencies),
        "throughput": {
            "tokens_per_s": None if embed else _rate(sum(r.generated_tokens for r in done), run.duration_s),
            "requests_per_s": _rate(len(done), run.duration_s),
        },
        "slo_attainment": _round(len(good) / sent, 4) if sent else None,
        "goodput_tokens_per_s": None if embed else _rate(sum(r.generated_tokens for r in good), run.duration_s),
        "goodput_requests_per_s": _rate(len(good), run.duration_s),
        "first_plan": first_layout(run),
        "replans": [replan_entry(r) for r in sorted(run.replans, key=lambda r: r.at_s)],
        "privacy_violations": run.privacy_violations,
        "quality": quality(run, kind),
        "utilisation": {node: _round(busy, 4) for node, busy in run.mean_utilisation().items()},
        "duration_s": _round(run.duration_s, 3),
        "interrupted": run.interrupted,
        "notes": list(run.notes),
        "reaction_s": _reaction_summary(run),
        "failed_by_error": dict(sorted(Counter(r.error or "unknown" for r in run.requests
                                               if r.outcome == "failed").items())),  # fmt: skip
        "events": [{"at_s": _round(e.at_s, 3), "kind": e.kind, "description": e.description,
                    "error": e.error} for e in sorted(run.events, key=lambda e: e.at_s)],  # fmt: skip
    }


def report_data(scenario: Scenario, runs: list[PolicyRun], command: str) -> dict[str, Any]:
    """The whole of report.json (``policies`` in the order the runs are given)."""
    kind = scenario.workload.kind
    return {
        "scenario": scenario.name,
        "policies": {run.policy: policy_metrics(run, scenario.slo, kind) for run in runs},
        "command": command,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": scenario.duration_s,
        "seed": scenario.seed,
        "model": scenario.model,
        "topology": str(scenario.topology),
        "workload": kind,
        "slo": {"ttft_s": scenario.slo.ttft_s, "tpot_s": scenario.slo.tpot_s,
                "latency_s": scenario.slo.latency_s},  # fmt: skip
    }


def write_report(out_dir: Path, scenario: Scenario, runs: list[PolicyRun], command: str) -> Path:
    """Write report.json, the PNG plots and report.md to ``out_dir``; return report.md's path.

    Synchronous CPU and file work (call it off the event loop). Works for partial runs:
    no runs, no requests, interrupted runs, runs without re-plans. Raises OSError when
    ``out_dir`` cannot be written.
    """
    from services.cli.scenarios.plots import write_plots  # matplotlib: only when writing

    out_dir.mkdir(parents=True, exist_ok=True)
    data = report_data(scenario, runs, command)
    _write_text(out_dir / REPORT_JSON, json.dumps(data, indent=2, allow_nan=False) + "\n")
    plots = write_plots(out_dir, scenario, runs)
    markdown = out_dir / REPORT_MD
    _write_text(markdown, render_markdown(scenario, runs, data, [p.name for p in plots]))
    return markdown


def _write_text(path: Path, text: str) -> None:
    """Write whole or not at all (a Ctrl-C mid-write leaves the previous file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
