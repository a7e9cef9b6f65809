"""report.md: the side-by-side table, a timeline per policy, the plots and the notes.

Rendered from the metrics that report.json holds (``report.report_data``), so the two
files never disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.cli.scenarios.records import PolicyRun
from services.cli.scenarios.spec import Scenario

Row = tuple[str, Callable[[dict[str, Any]], str]]


def _num(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value}{unit}"
    return f"{value:,.{digits}f}{unit}"


def _percent(value: Any) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _metric(*keys: str, digits: int = 1, percent: bool = False) -> Callable[[dict[str, Any]], str]:
    """A cell formatter for the number at ``keys`` in a policy's metrics."""

    def cell(metrics: dict[str, Any]) -> str:
        value: Any = metrics
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return _percent(value) if percent else _num(value, digits)

    return cell


def _rows(kind: str, nodes: list[str]) -> list[Row]:
    rows: list[Row] = [(label, _metric("requests", key)) for label, key in (
        ("requests sent", "sent"), ("completed", "completed"), ("failed", "failed"),
        ("lost", "lost"), ("mismatched", "mismatched"))]  # fmt: skip
    if kind == "embed":
        rows += [(f"latency p{p} (ms)", _metric("latency_ms", f"p{p}")) for p in (50, 95, 99)]
    else:
        rows += [(f"TTFT p{p} (ms)", _metric("ttft_ms", f"p{p}")) for p in (50, 95)]
        rows += [(f"TPOT p{p} (ms)", _metric("tpot_ms", f"p{p}")) for p in (50, 95, 99)]
        rows += [("latency p95 (ms)", _metric("latency_ms", "p95")),
                 ("throughput (tokens/s)", _metric("throughput", "tokens_per_s", digits=2))]  # fmt: skip
    rows += [("throughput (requests/s)", _metric("throughput", "requests_per_s", digits=3)),
             ("SLO attainment", _metric("slo_attainment", percent=True))]  # fmt: skip
    if kind != "embed":
        rows.append(("goodput (tokens/s)", _metric("goodput_tokens_per_s", digits=2)))
    rows += [
        ("goodput (requests/s)", _metric("goodput_requests_per_s", digits=3)),
        ("first plan", lambda metrics: _cell(metrics.get("first_plan") or "–")),
        ("re-plans", lambda metrics: _num(len(metrics["replans"]))),
        ("reaction p95 (s)", _metric("reaction_s", "p95", digits=2)),
        ("privacy violations", _metric("privacy_violations")),
        ("answers equal to fp32", _metric("quality", "exact_share", percent=True)),
        ("agreement with fp32 mean / min", lambda metrics: (
            f"{_num(metrics['quality']['agreement_mean'], 4)} / {_num(metrics['quality']['agreement_min'], 4)}"
            if metrics.get("quality") else "–")),
    ]
    rows += [(f"utilisation {node}", _metric("utilisation", node, percent=True)) for node in nodes]
    return rows


def side_by_side(kind: str, policies: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown table: one row per number, one column per policy."""
    names = list(policies)
    if not names:
        return ["No policy was run."]
    nodes: list[str] = []
    for metrics in policies.values():
        nodes += [node for node in metrics["utilisation"] if node not in nodes]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, value in _rows(kind, nodes):
        lines.append(f"| {label} | " + " | ".join(value(policies[name]) for name in names) + " |")
    return lines


def timeline(run: PolicyRun, metrics: dict[str, Any]) -> list[str]:
    """Events and re-plans of one policy in time order, as a Markdown table."""
    entries: list[tuple[float, int, str, str]] = []
    for event in metrics["events"]:
        outcome = f" (failed: {event['error']})" if event["error"] else ""
        entries.append((event["at_s"] or 0.0, 0, "event", f"{event['description']}{outcome}"))
    for replan in metrics["replans"]:
        parts = [
            f"trigger {replan['trigger']}",
            f"cause: {replan['cause']}" if replan["cause"] else "cause: –",
            f"reaction {_num(replan['reaction_s'], 2, ' s')}",
            f"TPOT predicted {_num(replan['predicted_tpot_ms'], 1, ' ms')}, "
            f"realised {_num(replan['realised_tpot_ms'], 1, ' ms')}",
            f"stall {_num(replan['stall_ms'], 1, ' ms')}",
            f"{replan['bytes_moved']:,} bytes moved",
            f"epoch {replan['epoch']}: {replan['layout']}",
        ]
        entries.append((replan["at_s"] or 0.0, 1, f"re-plan ({replan['kind']})", "; ".join(parts)))
    if not entries:
        return [f"No events or re-plans during {run.policy}'s run."]
    lines = ["| t (s) | what | details |", "|---:|---|---|"]
    for at_s, _, what, details in sorted(entries, key=lambda entry: (entry[0], entry[1])):
        lines.append(f"| {at_s:.2f} | {what} | {_cell(details)} |")
    return lines


def _header(scenario: Scenario, data: dict[str, Any]) -> list[str]:
    workload, slo = scenario.workload, scenario.slo
    arrival = (f"Poisson arrivals at {workload.rate_per_s:g}/s" if workload.arrival == "poisson"
               else f"closed loop, {workload.concurrency} in flight")  # fmt: skip
    targets = [f"{name} {value:g} s" for name, value in
               (("TTFT", slo.ttft_s), ("TPOT", slo.tpot_s), ("latency", slo.latency_s))
               if value is not None]  # fmt: skip
    return [
        f"# Scenario report: {scenario.name}",
        "",
        f"- command: `{data['command']}`",
        f"- generated: {data['generated_at']}",
        f"- model: {scenario.model}; topology: {scenario.topology.name}",
        f"- workload: {workload.kind}, {arrival}, {scenario.duration_s:g} s, seed {scenario.seed}"
        + (f", up to {workload.max_new_tokens} new tokens" if workload.kind == "generate" else ""),
        f"- SLO: {', '.join(targets) if targets else 'none set'}",
        f"- events: {len(scenario.events)} scheduled"
        + "".join(f"\n  - {event.at_s:g} s: {_cell(event.describe())}" for event in scenario.events),
    ]


def render_markdown(scenario: Scenario, runs: list[PolicyRun], data: dict[str, Any],
                    plots: list[str]) -> str:  # fmt: skip
    """The whole report.md (``plots``: PNG file names in the same folder)."""
    policies: dict[str, dict[str, Any]] = data["policies"]
    lines = _header(scenario, data)
    lines += ["", "## Side by side", ""] + side_by_side(scenario.workload.kind, policies)
    lines += ["", "Times are per request over completed requests (nearest-rank percentiles); "
              "SLO attainment counts failed and lost requests as misses; see docs/SCENARIOS.md."]  # fmt: skip
    lines += ["", "## Timeline"]
    for run in runs:
        lines += ["", f"### {run.policy}", ""] + timeline(run, policies[run.policy])
    lines += ["", "## Plots", ""]
    lines += [f"![{name.removesuffix('.png')}]({name})" for name in plots] or ["No plots."]
    notes = [f"- {run.policy}: interrupted after {run.duration_s:.1f} s (Ctrl-C)"
             for run in runs if run.interrupted]  # fmt: skip
    notes += [f"- {run.policy}: {_cell(note)}" for run in runs for note in run.notes]
    lines += ["", "## Notes", ""] + (notes or ["None."])
    return "\n".join(lines) + "\n"
