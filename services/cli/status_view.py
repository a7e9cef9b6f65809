"""The `edgesplit status --watch` view: a pure function from a snapshot to a rich renderable.

`render_status(snapshot, now_s)` draws four parts: the nodes (state, trust, epoch,
segments, measured load), the measured links (degraded ones in red and marked
DEGRADED, so a plain rendering shows them too), the plan as one band per node over the
model's blocks [0, L), and the latest decisions. It reads no clock and does no I/O, so
tests render it with ``Console(record=True)`` and read the text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from services.cli.status_state import StatusSnapshot
from shared.messages import (
    DecisionRecorded,
    LinkCapacity,
    NodeCapacity,
    Plan,
    PrivacyPolicy,
    Segment,
)

BAR_CELLS = 60
"""Width of the plan bar in characters; a model with fewer blocks gets whole cells per block."""
DECISIONS_SHOWN = 5
NODE_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan",
                "bright_magenta", "bright_green", "bright_yellow")  # fmt: skip
HELD, FREE, PRIVATE = "█", "·", "▒"


def render_status(
    snapshot: StatusSnapshot, now_s: float, *, decisions_shown: int = DECISIONS_SHOWN
) -> RenderableType:
    """The whole view of ``snapshot`` at Unix time ``now_s`` (seconds; for ages only)."""
    return Group(
        _header(snapshot, now_s),
        _nodes_table(snapshot, now_s),
        _links_table(snapshot),
        _plan_panel(snapshot),
        _decisions_table(snapshot, decisions_shown),
    )


def _header(snapshot: StatusSnapshot, now_s: float) -> Text:
    header = Text.assemble(
        ("edgesplit status", "bold"), f"  broker {snapshot.broker}  cluster {snapshot.cluster}  ",
        ("connected", "green") if snapshot.connected else ("reconnecting (data may be stale)", "bold red"),
        f"  {time.strftime('%H:%M:%S', time.localtime(now_s))}",
    )  # fmt: skip
    if snapshot.capacity is not None:
        header.append(f"  profile age {max(0.0, now_s - snapshot.capacity.as_of_s):.1f} s")
    if snapshot.policy is not None and snapshot.policy.policy.trusted_level > 0:
        header.append(f"\nprivacy: {snapshot.policy.policy.describe()}", style="yellow")
    refusals = snapshot.refusals()
    if refusals:
        header.append("\nrefused control messages: " + "; ".join(
            f"{who} " + ", ".join(f"{kind} {count}" for kind, count in counts.items())
            for who, counts in refusals.items()), style="bold red")  # fmt: skip
    return header


def _nodes_table(snapshot: StatusSnapshot, now_s: float) -> RenderableType:
    names = snapshot.node_names()
    if not names:
        return Text("nodes: none seen (is `edgesplit up` running, with the same --broker and --cluster?)",
                    style="dim")  # fmt: skip
    measured: dict[str, NodeCapacity] = (
        {n.node: n for n in snapshot.capacity.nodes} if snapshot.capacity else {}
    )
    # cpu/busy: the node's CPU and its compute thread's busy fraction (the plan's entry
    # node is marked in the plan bars below, which keeps this table within 80 columns)
    table = _table(f"nodes ({len(names)})", "node", "state", ">trust", ">epoch", "~holds",
                   ">cpu/busy", ">mem MB", ">KV MB", ">reqs", ">ovf", ">ms/blk", ">seen")  # fmt: skip
    for name in names:
        status, capacity = snapshot.nodes.get(name), measured.get(name)
        state, style = _node_state(status.state if status else None, capacity)
        holds = " ".join(f"[{s.start},{s.end})" for s in status.segments) if status else ""
        table.add_row(
            name, Text(state, style=style), str(status.trust) if status else "",
            str(status.epoch) if status and status.epoch is not None else "", holds,
            *_load_cells(status.memory_bytes if status else 0, capacity, now_s,
                         status.kv_budget_bytes if status else None),
        )  # fmt: skip
    emulated = [(name, _emulation_text(snapshot, name)) for name in names]
    lines = [Text(f"emulated {name}: {text}", style="yellow") for name, text in emulated if text]
    forged = ", ".join(f"{name} {count}" for name, count in sorted(snapshot.forged.items()) if count)
    if forged:  # frames that failed authentication (docs/SECURITY.md, "Frames")
        lines.append(Text(f"forged frames dropped: {forged}", style="red"))
    return Group(table, *lines) if lines else table


def _table(title: str, *columns: str) -> Table:
    """A compact table. Column ``x`` is left-aligned and never wrapped, ``>x`` right-aligned
    (numbers) and never wrapped, ``~x`` left-aligned and wrapped: on a narrow terminal
    only the ``~`` columns (names, free text) give up width."""
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  show_edge=False, padding=0, expand=False)  # fmt: skip
    for column in columns:
        kind = column[0] if column[0] in ">~" else ""
        table.add_column(column.removeprefix(kind), justify="right" if kind == ">" else "left",
                         no_wrap=kind != "~", overflow="fold")  # fmt: skip
    return table


def _node_state(state: str | None, capacity: NodeCapacity | None) -> tuple[str, str]:
    """(text, style): the node's own status, and the monitor's health when it differs."""
    health = capacity.health if capacity is not None else None
    if state == "offline" or health == "down":
        reason = f" ({capacity.down_reason})" if capacity is not None and capacity.down_reason else ""
        return (state or "down") + reason, "bold red"
    if health == "overloaded":
        return "overloaded", "bold yellow"
    return state or "unknown", "green" if state == "online" else "dim"


def _load_cells(memory_bytes: int, capacity: NodeCapacity | None, now_s: float,
                kv_budget_bytes: int | None = None) -> list[str]:  # fmt: skip
    """cpu/busy (fractions), memory used/budget (MB), KV cache in use/its budget (MB; the
    budget as the node announces it), requests in flight (+ waiting at the entry), decode time (ms per block per
    token), seen (s ago); ovf: items the node's bounded queues refused or dropped."""
    budget_kv = f"/{kv_budget_bytes / 1e6:.1f}" if kv_budget_bytes is not None else ""
    if capacity is None:
        return ["", f"-/{memory_bytes / 1e6:.0f}" if memory_bytes else "", f"-{budget_kv}" if budget_kv else "",
                "", "", "", ""]  # fmt: skip
    budget = capacity.memory_bytes or memory_bytes
    decode = capacity.decode_s_per_block
    return [
        f"{capacity.cpu_utilisation:.0%}/{capacity.utilisation:.0%}",
        f"{capacity.memory_used_bytes / 1e6:.0f}/{budget / 1e6:.0f}",
        f"{capacity.kv_cache_bytes / 1e6:.1f}{budget_kv}", _requests(capacity),
        str(capacity.queue_overflows),
        f"{decode * 1e3:.3f}" if decode is not None else "",
        f"{max(0.0, now_s - capacity.last_seen_s):.1f}s" if capacity.last_seen_s else "",
    ]  # fmt: skip


def _requests(capacity: NodeCapacity) -> str:
    """Requests in flight, and ``+N`` waiting in the entry's queue when any wait."""
    queued = f"+{capacity.requests_queued}" if capacity.requests_queued else ""
    return f"{capacity.requests_in_flight}{queued}"


def _emulation_text(snapshot: StatusSnapshot, node: str) -> str:
    emulation = snapshot.emulation.get(node)
    if emulation is None:
        return ""
    parts = [f"slowdown x{emulation.slowdown:g}"] if emulation.slowdown != 1 else []
    for link in emulation.links:
        rate = _rate(link.bandwidth_bytes_per_s) if link.bandwidth_bytes_per_s else "unshaped"
        parts.append(f"to {link.dst} {rate} +{link.latency_s * 1e3:.0f} ms")
    return ", ".join(parts)


def _links_table(snapshot: StatusSnapshot) -> RenderableType:
    links = sorted(snapshot.capacity.links, key=lambda link: (link.src, link.dst)) if snapshot.capacity else []
    if not links:
        return Text("links: none measured yet", style="dim")
    table = _table(f"measured links ({len(links)})", "link", ">bandwidth", ">latency ms", ">rtt ms",
                   ">loss", "source", "~health")  # fmt: skip
    for link in links:
        degraded = link.health == "degraded"
        table.add_row(
            f"{link.src} -> {link.dst}", _rate(link.bandwidth_bytes_per_s),
            f"{link.latency_s * 1e3:.1f}", f"{link.rtt_s * 1e3:.1f}" if link.rtt_s is not None else "",
            f"{link.loss:.0%}", link.bandwidth_source, _link_health(link),
            style="bold red" if degraded else None,
        )  # fmt: skip
    return table


def _link_health(link: LinkCapacity) -> str:
    if link.health == "degraded":
        return "DEGRADED" + (f" ({', '.join(link.degraded)})" if link.degraded else "")
    return link.health


def _rate(bytes_per_s: float) -> str:
    """A bandwidth in B/s, kB/s, MB/s or GB/s (decimal units, as everywhere in edgesplit)."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.2f} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def _plan_panel(snapshot: StatusSnapshot) -> RenderableType:
    plan = snapshot.plan
    if plan is None:
        return Text("plan: none published", style="dim")
    return PlanBars(plan, snapshot.policy.policy if snapshot.policy is not None else None)


class PlanBars:
    """The plan as one band per node over blocks [0, L), sized to the width it is given."""

    def __init__(self, plan: Plan, policy: PrivacyPolicy | None) -> None:
        self.plan, self.policy = plan, policy
        self.blocks = max(segment.end for segment in plan.segments)
        self.owners = list(dict.fromkeys(segment.node for segment in plan.segments))  # pipeline order

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        plan, blocks = self.plan, self.blocks
        yield Text(f"plan: epoch {plan.epoch} · model {plan.model_id} · entry {plan.entry_node} · "
                   f"{blocks} blocks", style="bold")  # fmt: skip
        name_width = max(len(name) for name in [*self.owners, "policy"])
        room = max(8, min(BAR_CELLS, options.max_width - name_width - 24))  # 24: the ranges after it
        cells = room if blocks > room else blocks * (room // blocks)
        axis = f"0{str(blocks):>{cells - 1}}" if cells > len(str(blocks)) else ""
        yield Text(f"{'':<{name_width}}  {axis}", style="dim")
        for index, node in enumerate(self.owners):
            held = [s for s in plan.segments if s.node == node]
            line = Text(f"{node:<{name_width}}  ")
            line.append(band(held, blocks, cells), style=NODE_COLOURS[index % len(NODE_COLOURS)])
            line.append("  " + " ".join(f"[{s.start},{s.end})" for s in held))
            if node == plan.entry_node:
                line.append(" entry", style="bold")
            yield line
        policy = self.policy
        if policy is not None and policy.trusted_level > 0 and policy.protects_any(0, blocks, blocks):
            private = [block for block in range(blocks) if policy.is_private(block, blocks)]
            row = "".join(PRIVATE if _covers(private, cell, blocks, cells) else FREE
                          for cell in range(cells))  # fmt: skip
            yield Text(f"{'policy':<{name_width}}  {row}  private: trust >= {policy.trusted_level}",
                       style="yellow")  # fmt: skip


def band(segments: Sequence[Segment], blocks: int, cells: int) -> str:
    """One node's row of the plan bar: ``cells`` characters over blocks [0, ``blocks``).

    A cell is drawn held when any block it covers lies in one of ``segments``, so a
    one-block segment stays visible however many blocks the model has.
    """
    held = [b for segment in segments for b in range(segment.start, min(segment.end, blocks))]
    return "".join(HELD if _covers(held, cell, blocks, cells) else FREE for cell in range(cells))


def _covers(marked: Sequence[int], cell: int, blocks: int, cells: int) -> bool:
    first = cell * blocks // cells
    last = max(first + 1, math.ceil((cell + 1) * blocks / cells))  # cell spans blocks [first, last)
    return any(first <= block < last for block in marked)


def _decisions_table(snapshot: StatusSnapshot, count: int) -> RenderableType:
    decisions = snapshot.latest_decisions(count)
    if not decisions:
        return Text("decisions: none recorded yet", style="dim")
    # ms/tok: the running plan's predicted time per output token -> the chosen plan's;
    # gain s: predicted time saved over the horizon (the cost is in `status`, kept out
    # here so that the table fits 80 columns)
    table = _table(f"latest decisions (of {len(snapshot.decisions)})", ">#", "at", "~trigger",
                   "action", "~outcome", ">ms/tok", ">gain s", "~realised ms/tok")  # fmt: skip
    for decision in reversed(decisions):  # newest first
        table.add_row(*_decision_cells(decision), style="bold" if decision.action != "keep" else None)
    return table


def _decision_cells(d: DecisionRecorded) -> list[str]:
    trigger = f"{d.trigger}: {d.trigger_detail}" if d.trigger_detail else d.trigger
    outcome = d.outcome + (f" epoch {d.to_epoch}" if d.to_epoch is not None else "")
    predictions = (d.current_latency_s, d.predicted_latency_s)
    latency = "->".join(f"{v * 1e3:.1f}" if v is not None else "?" for v in predictions)
    if predictions == (None, None):
        latency = ""
    realised = f"{d.realised_tpot_s * 1e3:.1f}" if d.realised_tpot_s is not None else ""
    if realised and d.baseline_tpot_s is not None:
        realised += f" (was {d.baseline_tpot_s * 1e3:.1f})"
    at = time.strftime("%H:%M:%S", time.localtime(d.at_s)) if d.at_s else ""
    return [str(d.decision_id), at, trigger, d.action + (" (emergency)" if d.emergency else ""),
            outcome, latency, f"{d.predicted_gain_s:.3f}", realised]  # fmt: skip
