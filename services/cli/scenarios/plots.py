"""The report's plots (PNG, matplotlib's Agg renderer; no display, no pyplot state).

- tpot.png: time per output token of each completed request over its send time, one
  colour per policy (embed workloads: latency), failed and lost requests as x along the
  top, events as grey dashed lines, re-plans as coloured dotted lines;
- placement.png: one subplot per policy, one band per node, the blocks it ran over time;
- utilisation.png: mean busy fraction per node, bars grouped by policy.

Synchronous CPU work: call it off the event loop. Empty data gives a figure that says so.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from services.cli.scenarios.records import Placement, PolicyRun
from services.cli.scenarios.spec import Scenario

POLICY_COLOURS = {"static": "tab:red", "migrate": "tab:orange", "adaptive": "tab:blue",
                  "compressed": "tab:green"}
OTHER_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
DPI = 100


def policy_colour(policy: str, index: int) -> str:
    return POLICY_COLOURS.get(policy, OTHER_COLOURS[index % len(OTHER_COLOURS)])


def write_plots(out_dir: Path, scenario: Scenario, runs: list[PolicyRun]) -> list[Path]:
    """Write tpot.png, placement.png and utilisation.png to ``out_dir``; return their paths."""
    return [
        plot_request_times(out_dir / "tpot.png", scenario, runs),
        plot_placements(out_dir / "placement.png", scenario, runs),
        plot_utilisation(out_dir / "utilisation.png", runs),
    ]


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _no_data(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="grey")


def _mark_events(axes: Axes, scenario: Scenario) -> None:
    for event in scenario.events:
        axes.axvline(event.at_s, color="grey", linestyle="--", linewidth=0.8)
        axes.text(event.at_s, 0.98, f" {event.kind}", transform=axes.get_xaxis_transform(),
                  rotation=90, va="top", ha="left", fontsize=7, color="grey")  # fmt: skip


def plot_request_times(path: Path, scenario: Scenario, runs: list[PolicyRun]) -> Path:
    """TPOT (ms) per completed request over its send time (embed: latency)."""
    embed = scenario.workload.kind == "embed"
    figure = Figure(figsize=(10, 5))
    axes = figure.add_subplot()
    plotted = 0
    for index, run in enumerate(runs):
        colour = policy_colour(run.policy, index)
        points = sorted(
            (r.sent_at_s, value * 1000.0)
            for r in run.requests if r.outcome == "completed"
            for value in [r.latency_s if embed else r.tpot_s] if value is not None
        )  # fmt: skip
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker=".", linewidth=0.8, color=colour, label=run.policy)
            plotted += len(points)
        unanswered = [r.sent_at_s for r in run.requests if r.outcome != "completed"]
        if unanswered:  # failed or lost: an x along the top, where no time can be drawn
            axes.plot(unanswered, [0.97] * len(unanswered), linestyle="none", marker="x",
                      color=colour, transform=axes.get_xaxis_transform(), clip_on=False,
                      label=f"{run.policy} failed/lost")  # fmt: skip
        for number, replan in enumerate(run.replans):
            axes.axvline(replan.at_s, color=colour, linestyle=":", linewidth=1.2,
                         label=f"{run.policy} re-plan" if number == 0 else None)  # fmt: skip
    _mark_events(axes, scenario)
    axes.set_xlim(0, max([scenario.duration_s] + [run.duration_s for run in runs]))
    axes.set_xlabel("request sent at (s)")
    axes.set_ylabel("latency (ms)" if embed else "time per output token (ms)")
    axes.set_title(f"{scenario.name}: {'latency' if embed else 'TPOT'} per request")
    if plotted:
        axes.set_ylim(bottom=0, top=axes.get_ylim()[1] * 1.08)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        _no_data(axes, "no completed requests")
    return _save(figure, path)


def plan_intervals(run: PolicyRun) -> list[tuple[float, float, Placement]]:
    """(from_s, to_s, placement) for each placement: a plan (one epoch) holds from its first
    placement until the next epoch's, the last until the end of the run."""
    by_epoch: dict[int, list[Placement]] = defaultdict(list)
    for placement in run.placements:
        by_epoch[placement.epoch].append(placement)
    starts = sorted((min(p.at_s for p in group), epoch) for epoch, group in by_epoch.items())
    intervals: list[tuple[float, float, Placement]] = []
    for position, (start_s, epoch) in enumerate(starts):
        end_s = starts[position + 1][0] if position + 1 < len(starts) else run.duration_s
        intervals += [(start_s, max(end_s, start_s), p) for p in by_epoch[epoch]]
    return intervals


def _plot_plan(axes: Axes, scenario: Scenario, run: PolicyRun, colour: str) -> None:
    nodes = run.all_nodes()
    rows = {node: row for row, node in enumerate(nodes)}
    intervals = plan_intervals(run)
    last_block = max((p.end for _, _, p in intervals), default=1)
    for start_s, end_s, placement in intervals:
        shade = 0.25 + 0.6 * placement.start / max(last_block, 1)
        axes.broken_barh([(start_s, end_s - start_s)], (rows[placement.node] - 0.4, 0.8),
                         facecolors=[(0.2, 0.4, 0.8, shade)], edgecolor="black", linewidth=0.5)  # fmt: skip
        axes.text((start_s + end_s) / 2, rows[placement.node], f"[{placement.start},{placement.end})",
                  ha="center", va="center", fontsize=7, clip_on=True)  # fmt: skip
    for replan in run.replans:
        axes.axvline(replan.at_s, color=colour, linestyle=":", linewidth=1.2)
    for event in scenario.events:
        axes.axvline(event.at_s, color="grey", linestyle="--", linewidth=0.8)
    axes.set_yticks(range(len(nodes)), list(nodes))
    axes.set_ylim(-0.6, max(len(nodes), 1) - 0.4)
    axes.set_title(f"{run.policy}: blocks per node ({len(run.replans)} re-plans)", fontsize=9)
    if not intervals:
        _no_data(axes, "no plan recorded")


def plot_placements(path: Path, scenario: Scenario, runs: list[PolicyRun]) -> Path:
    """One subplot per policy: which node ran which blocks [start, end) over time."""
    figure = Figure(figsize=(10, 1.2 + 1.8 * max(len(runs), 1)))
    if not runs:
        _no_data(figure.add_subplot(), "no policy was run")
        return _save(figure, path)
    axes_list = figure.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
    for index, (axes, run) in enumerate(zip(axes_list, runs, strict=True)):
        _plot_plan(axes, scenario, run, policy_colour(run.policy, index))
    axes_list[-1].set_xlim(0, max([scenario.duration_s] + [run.duration_s for run in runs]))
    axes_list[-1].set_xlabel("time (s); grey dashes: events, dots: re-plans")
    return _save(figure, path)


def plot_utilisation(path: Path, runs: list[PolicyRun]) -> Path:
    """Mean busy fraction per node, one bar per policy in each node's group."""
    figure = Figure(figsize=(10, 4.5))
    axes = figure.add_subplot()
    nodes: list[str] = []
    for run in runs:
        nodes += [node for node in run.all_nodes() if node not in nodes]
    width = 0.8 / max(len(runs), 1)
    for index, run in enumerate(runs):
        means = run.mean_utilisation()
        xs = [position + (index - (len(runs) - 1) / 2) * width for position in range(len(nodes))]
        axes.bar(xs, [means.get(node, 0.0) * 100 for node in nodes], width=width,
                 color=policy_colour(run.policy, index), label=run.policy)  # fmt: skip
    axes.set_xticks(range(len(nodes)), nodes)
    axes.set_ylim(0, 100)
    axes.set_ylabel("mean busy (%)")
    axes.set_title("per-node utilisation")
    if nodes:
        axes.legend(fontsize=8)
    else:
        _no_data(axes, "no nodes")
    return _save(figure, path)
