"""Scenario files (TOML): the parsed, validated form (docs/SCENARIOS.md is the contract).

``load_scenario(path)`` reads a file: every problem is a ``ScenarioError`` whose message is
one line naming the key, e.g. ``events[2].node: unknown node 'rsu9' (topology has car,
rsu1, mec)``; event indices count from 0 in file order. Unknown keys are refused, so a
typo is never ignored. The field checks are in spec_fields.py, trace CSVs in trace_file.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from services.cli.scenarios.spec_fields import (
    ScenarioError,
    check_model_fits,
    choice,
    flag,
    integer,
    model_and_family,
    node_name,
    number,
    one_line,
    read_toml,
    refuse_unknown,
    refuse_with,
    relative_file,
    section,
    text,
    topology_nodes,
)
from services.cli.scenarios.trace_file import read_trace

POLICIES: tuple[str, ...] = ("static", "migrate", "adaptive")
"""What ``--policy all`` runs."""
NAMED_POLICIES: tuple[str, ...] = (*POLICIES, "compressed")
"""Every policy ``--policy LIST`` may name: ``compressed`` is adaptive with the planner
choosing each hop's activation precision (services/cli/scenarios/stack.py,
``COMPRESSED_PRECISION``)."""
EventKind = Literal["link", "link_trace", "slowdown", "kill", "restart", "join", "leave", "privacy"]
EVENT_KINDS: tuple[str, ...] = ("link", "link_trace", "slowdown", "kill", "restart", "join", "leave",
                                "privacy")  # fmt: skip


@dataclass(frozen=True)
class TracePoint:
    """One row of a link trace CSV: from ``t_s`` after the event's ``at_s`` on."""

    t_s: float
    bandwidth_bytes_per_s: float
    latency_s: float | None = None


@dataclass(frozen=True)
class Event:
    """A timed event. Which fields are set depends on ``kind`` (the others stay None)."""

    at_s: float
    kind: EventKind
    node: str | None = None  # slowdown, kill, restart, join, leave
    src: str | None = None  # link, link_trace
    dst: str | None = None
    bandwidth_bytes_per_s: float | None = None  # link
    latency_s: float | None = None  # link
    one_way: bool = False  # link, link_trace
    trace: tuple[TracePoint, ...] = ()  # link_trace (read from its CSV file)
    factor: float | None = None  # slowdown
    private_blocks: int | None = None  # privacy
    trusted_level: int | None = None  # privacy

    def describe(self) -> str:
        """One short line for progress output and the report's timeline."""
        if self.kind == "link":
            return (f"link {self.src}->{self.dst}{'' if self.one_way else ' (both ways)'}: "
                    f"{(self.bandwidth_bytes_per_s or 0) / 1e3:g} kB/s"
                    + (f" + {self.latency_s * 1e3:g} ms" if self.latency_s is not None else ""))  # fmt: skip
        if self.kind == "link_trace":
            return f"link trace {self.src}->{self.dst}: {len(self.trace)} points"
        if self.kind == "slowdown":
            return f"slowdown {self.node} x{self.factor:g}"
        if self.kind == "privacy":
            return f"privacy: {self.private_blocks} private blocks, trust >= {self.trusted_level}"
        return f"{self.kind} {self.node}"


@dataclass(frozen=True)
class Workload:
    kind: Literal["generate", "embed"]
    arrival: Literal["poisson", "closed"]
    rate_per_s: float | None  # poisson
    concurrency: int | None  # closed
    prompts: tuple[str, ...] = ()  # text prompts, or
    prompt_ids: tuple[tuple[int, ...], ...] = ()  # token-id prompts (exactly one is non-empty)
    max_new_tokens: int = 16


@dataclass(frozen=True)
class Slo:
    """Per-request targets; a request meets the SLO when every set target is met."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None  # embed


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path  # the scenario file (relative paths in it are from its folder)
    topology: Path  # absolute
    model: str  # a packaged model name (smollm2, minilm, tiny-llama, ...) or an absolute folder
    duration_s: float
    seed: int
    workload: Workload
    slo: Slo
    events: tuple[Event, ...] = field(default=())  # sorted by at_s


# --- reading a scenario file -----------------------------------------------------------

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # it may name a folder
MAX_NEW_TOKENS = 4096
MAX_CONCURRENCY = 1024
MAX_SLOWDOWN = 1000.0

TOP_KEYS = ("name", "topology", "model", "duration_s", "seed", "workload", "slo", "events")
WORKLOAD_KEYS = ("kind", "arrival", "rate_per_s", "concurrency", "prompts", "prompt_ids",
                 "prompts_file", "max_new_tokens")  # fmt: skip
SLO_KEYS = ("ttft_s", "tpot_s", "latency_s")
EVENT_KEYS: dict[str, tuple[str, ...]] = {
    "link": ("src", "dst", "bandwidth_bytes_per_s", "latency_s", "one_way"),
    "link_trace": ("src", "dst", "file", "one_way"),
    "slowdown": ("node", "factor"),
    "kill": ("node",),
    "restart": ("node",),
    "join": ("node",),
    "leave": ("node",),
    "privacy": ("private_blocks", "trusted_level"),
}


def load_scenario(path: Path) -> Scenario:
    """Read and validate the scenario file at ``path``.

    Relative paths in the file (topology, model folder, prompts_file, trace files) are
    resolved from the file's folder. Raises ScenarioError (one line: ``KEY: problem``; a
    file that cannot be read or is not TOML names the file, and the line for syntax errors).
    """
    file = Path(path).resolve()
    data = read_toml(file)
    refuse_unknown(data, TOP_KEYS, "")
    base = file.parent
    name = _name(data, file)
    topology_file, node_ids = topology_nodes(data, base)
    model, family = model_and_family(data, base)
    duration_s = number(data, "duration_s", "", gt=0.0)
    seed = integer(data, "seed", "", default=0, ge=0)
    workload = _workload(section(data, "workload", "", required=True), base)
    check_model_fits(workload.kind, model, family)
    slo = _slo(section(data, "slo", "", required=False), workload.kind)
    events = _events(data.get("events", []), base, duration_s, node_ids)
    return Scenario(name=name, path=file, topology=topology_file, model=model,
                    duration_s=duration_s, seed=seed, workload=workload, slo=slo,
                    events=tuple(sorted(events, key=lambda event: event.at_s)))  # fmt: skip


def time_scaled(scenario: Scenario, factor: float) -> Scenario:
    """``scenario`` with its duration, event times and trace times multiplied by
    ``factor`` (a shortened run for CI or a quick look: the same story, faster)."""
    if not (0 < factor <= 10):
        raise ScenarioError(f"--time-scale: must be in (0, 10] (got {factor:g})")
    events = tuple(
        replace(event, at_s=event.at_s * factor,
                trace=tuple(replace(point, t_s=point.t_s * factor) for point in event.trace))
        for event in scenario.events
    )  # fmt: skip
    return replace(scenario, duration_s=scenario.duration_s * factor, events=events)


# --- sections -------------------------------------------------------------------------


def _name(data: Mapping[str, Any], file: Path) -> str:
    name = text(data, "name", "") if "name" in data else file.stem
    if not NAME_PATTERN.fullmatch(name):
        source = "" if "name" in data else " (from the file name; set name = ...)"
        raise ScenarioError(f"name: {name!r}{source} must be 1 to 64 letters, digits, '.', '_' "
                            "or '-', starting with a letter or digit")  # fmt: skip
    return name


def _workload(table: Mapping[str, Any], base: Path) -> Workload:
    where = "workload"
    refuse_unknown(table, WORKLOAD_KEYS, where)
    kind = choice(table, "kind", where, ("generate", "embed"))
    arrival = choice(table, "arrival", where, ("poisson", "closed"))
    rate_per_s: float | None = None
    concurrency: int | None = None
    if arrival == "poisson":
        refuse_with(table, "concurrency", where, 'arrival = "poisson" (it is for "closed")')
        if "rate_per_s" not in table:
            raise ScenarioError(f'{where}.rate_per_s: required when arrival = "poisson"')
        rate_per_s = number(table, "rate_per_s", where, gt=0.0)
    else:
        refuse_with(table, "rate_per_s", where, 'arrival = "closed" (it is for "poisson")')
        if "concurrency" not in table:
            raise ScenarioError(f'{where}.concurrency: required when arrival = "closed"')
        concurrency = integer(table, "concurrency", where, ge=1, le=MAX_CONCURRENCY)
    if kind == "embed":
        refuse_with(table, "max_new_tokens", where, 'kind = "embed" (embeddings generate no tokens)')
    max_new_tokens = integer(table, "max_new_tokens", where, default=16, ge=1, le=MAX_NEW_TOKENS)
    prompts, prompt_ids = _prompts(table, base)
    return Workload(kind=cast(Literal["generate", "embed"], kind),
                    arrival=cast(Literal["poisson", "closed"], arrival),
                    rate_per_s=rate_per_s, concurrency=concurrency,
                    prompts=prompts, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens)  # fmt: skip


def _prompts(table: Mapping[str, Any], base: Path) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    given = [key for key in ("prompts", "prompt_ids", "prompts_file") if key in table]
    if len(given) != 1:
        problem = "missing" if not given else f"give only one, not {' and '.join(given)}"
        raise ScenarioError(f"workload.prompts: exactly one of prompts, prompt_ids or prompts_file "
                            f"is required ({problem})")  # fmt: skip
    key = f"workload.{given[0]}"
    if given[0] == "prompts":
        return _prompt_texts(table["prompts"], key), ()
    if given[0] == "prompt_ids":
        return (), _prompt_id_lists(table["prompt_ids"], key)
    file = relative_file(text(table, "prompts_file", "workload"), base, key, "prompts file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioError(f"{key}: cannot read {file} ({one_line(error)})") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise ScenarioError(f"{key}: {file} has no prompts (one prompt per non-empty line)")
    return prompts, ()


def _prompt_texts(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ScenarioError(f"{key}: must be a non-empty list of strings")
    for index, prompt in enumerate(value):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ScenarioError(f"{key}[{index}]: must be a non-empty string (got {prompt!r})")
    return tuple(value)


def _prompt_id_lists(value: Any, key: str) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list) or not value:
        raise ScenarioError(f"{key}: must be a non-empty list of token-id lists")
    for index, ids in enumerate(value):
        if not isinstance(ids, list) or not ids:
            raise ScenarioError(f"{key}[{index}]: must be a non-empty list of token ids")
        for position, token in enumerate(ids):
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ScenarioError(f"{key}[{index}][{position}]: must be a token id, an "
                                    f"integer >= 0 (got {token!r})")  # fmt: skip
    return tuple(tuple(ids) for ids in value)


def _slo(table: Mapping[str, Any], kind: str) -> Slo:
    refuse_unknown(table, SLO_KEYS, "slo")
    if kind == "embed":
        for key in ("ttft_s", "tpot_s"):
            refuse_with(table, key, "slo", 'kind = "embed" (use latency_s)')
    targets = {key: number(table, key, "slo", gt=0.0) if key in table else None for key in SLO_KEYS}
    return Slo(**targets)


def _events(value: Any, base: Path, duration_s: float, node_ids: tuple[str, ...]) -> list[Event]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ScenarioError("events: must be an array of tables ([[events]] sections)")
    return [_event(item, f"events[{index}]", base, duration_s, node_ids)
            for index, item in enumerate(value)]  # fmt: skip


def _event(table: Mapping[str, Any], where: str, base: Path, duration_s: float,
           node_ids: tuple[str, ...]) -> Event:  # fmt: skip
    kind = choice(table, "kind", where, EVENT_KINDS)
    refuse_unknown(table, ("at_s", "kind", *EVENT_KEYS[kind]), where, f" for kind = {kind!r}")
    at_s = number(table, "at_s", where, ge=0.0)
    if at_s >= duration_s:
        raise ScenarioError(f"{where}.at_s: must be < duration_s = {duration_s:g} (got {at_s:g})")
    fields: dict[str, Any] = {}
    for key in ("node", "src", "dst"):
        if key in EVENT_KEYS[kind]:
            fields[key] = node_name(table, key, where, node_ids)
    if "src" in fields and fields["src"] == fields["dst"]:
        raise ScenarioError(f"{where}.dst: must differ from src ({fields['src']!r})")
    if "one_way" in EVENT_KEYS[kind]:
        fields["one_way"] = flag(table, "one_way", where, default=False)
    if kind == "link":
        fields["bandwidth_bytes_per_s"] = number(table, "bandwidth_bytes_per_s", where, gt=0.0)
        if "latency_s" in table:
            fields["latency_s"] = number(table, "latency_s", where, ge=0.0)
    elif kind == "link_trace":
        file = relative_file(text(table, "file", where), base, f"{where}.file", "trace file")
        fields["trace"] = tuple(TracePoint(*row) for row in read_trace(file, f"{where}.file"))
    elif kind == "slowdown":
        fields["factor"] = number(table, "factor", where, ge=1.0, le=MAX_SLOWDOWN)
    elif kind == "privacy":
        fields["private_blocks"] = integer(table, "private_blocks", where, ge=0)
        fields["trusted_level"] = integer(table, "trusted_level", where, ge=0)
    return Event(at_s=at_s, kind=cast(EventKind, kind), **fields)
