"""Reading scenario files: TOML in, a validated ``Scenario`` out (docs/SCENARIOS.md).

Every problem is a ``ScenarioError`` whose message is one line, ``KEY: problem``, where KEY
is the dotted path of the offending key (``workload.rate_per_s``, ``events[2].node``; event
indices count from 0 in file order). Unknown keys are refused so a typo is never ignored;
numbers must be finite (TOML allows ``inf`` and ``nan``, scenarios do not).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

from services.scenario.spec import (
    EVENT_KINDS,
    Event,
    EventKind,
    Scenario,
    ScenarioError,
    Slo,
    Workload,
)
from services.scenario.trace_file import read_trace
from shared.errors import ConfigError, UnsupportedArchitecture
from shared.model.config import detect_architecture
from shared.model.prepare import PACKAGED_MODELS
from shared.topology import load_topology

TINY_MODELS: tuple[str, ...] = ("tiny-llama", "tiny-gpt2", "tiny-bert")
PACKAGED_FAMILIES = {"smollm2": "llama", "minilm": "bert"}  # tiny-ARCH: ARCH
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


def packaged_model_names() -> tuple[str, ...]:
    """Model names a scenario may give instead of a folder (sorted)."""
    return tuple(sorted((*PACKAGED_MODELS, *TINY_MODELS)))


def load_scenario(path: Path) -> Scenario:
    """Read and validate the scenario file at ``path``.

    Relative paths in the file (topology, model folder, prompts_file, trace files) are
    resolved from the file's folder. Raises ScenarioError (one line: ``KEY: problem``; a
    file that cannot be read or is not TOML names the file, and the line for syntax errors).
    """
    file = Path(path).resolve()
    data = _read_toml(file)
    _refuse_unknown(data, TOP_KEYS, "")
    base = file.parent
    name = _string(data, "name", "") if "name" in data else file.stem
    topology_file, node_ids = _topology(data, base)
    model, family = _model(data, base)
    duration_s = _number(data, "duration_s", "", gt=0.0)
    seed = _integer(data, "seed", "", default=0, ge=0)
    workload = _workload(_table(data, "workload", "", required=True), base)
    _check_model_fits(workload.kind, model, family)
    slo = _slo(_table(data, "slo", "", required=False), workload.kind)
    events = _events(data.get("events", []), base, duration_s, node_ids)
    return Scenario(name=name, path=file, topology=topology_file, model=model,
                    duration_s=duration_s, seed=seed, workload=workload, slo=slo,
                    events=tuple(sorted(events, key=lambda event: event.at_s)))  # fmt: skip


# --- files ----------------------------------------------------------------------------


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{file}: scenario file does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioError(f"{file}: cannot read the scenario file ({_one_line(error)})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:  # its message ends "(at line N, column M)"
        raise ScenarioError(f"{file}: not valid TOML: {_one_line(error)}") from None


def _relative_file(value: str, base: Path, key: str, what: str) -> Path:
    file = (base / value).resolve()
    if not file.is_file():
        raise ScenarioError(f"{key}: {what} {file} does not exist")
    return file


def _topology(data: Mapping[str, Any], base: Path) -> tuple[Path, tuple[str, ...]]:
    file = _relative_file(_string(data, "topology", ""), base, "topology", "topology file")
    try:
        topology = load_topology(file)
    except ConfigError as error:
        raise ScenarioError(f"topology: {_one_line(error)}") from None
    return file, tuple(node.id for node in topology.nodes)


def _model(data: Mapping[str, Any], base: Path) -> tuple[str, str | None]:
    """The model (a packaged name, or an absolute folder) and its family (None: unknown)."""
    value = _string(data, "model", "")
    names = packaged_model_names()
    if value in names:
        return value, PACKAGED_FAMILIES.get(value, value.removeprefix("tiny-"))
    folder = (base / value).resolve()
    config = folder / "config.json"
    if not config.is_file():
        problem = "does not exist" if not folder.exists() else "has no config.json"
        raise ScenarioError(f"model: {value!r} is neither a packaged model ({', '.join(names)}) "
                            f"nor a checkpoint folder ({folder} {problem})")  # fmt: skip
    try:
        family = detect_architecture(json.loads(config.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError) as error:  # JSONDecodeError is a ValueError
        raise ScenarioError(f"model: {config} is not a readable JSON object ({_one_line(error)})") from None
    except UnsupportedArchitecture as error:
        raise ScenarioError(f"model: {config}: {_one_line(error)}") from None
    return str(folder), family


def _check_model_fits(kind: str, model: str, family: str | None) -> None:
    """Embeddings need an encoder (BERT), generation a decoder (GPT-2, Llama)."""
    if family is None or (kind == "embed") == (family == "bert"):
        return
    if kind == "embed":
        raise ScenarioError(f'workload.kind: "embed" needs a BERT encoder (minilm, tiny-bert or a '
                            f"BERT folder); model {model} is a {family} decoder")  # fmt: skip
    raise ScenarioError(f'workload.kind: "generate" needs a decoder (smollm2, tiny-llama, tiny-gpt2 '
                        f"or a GPT-2/Llama folder); model {model} is a BERT encoder")  # fmt: skip


# --- sections -------------------------------------------------------------------------


def _workload(table: Mapping[str, Any], base: Path) -> Workload:
    where = "workload"
    _refuse_unknown(table, WORKLOAD_KEYS, where)
    kind = _choice(table, "kind", where, ("generate", "embed"))
    arrival = _choice(table, "arrival", where, ("poisson", "closed"))
    rate_per_s: float | None = None
    concurrency: int | None = None
    if arrival == "poisson":
        _refuse_with(table, "concurrency", where, 'arrival = "poisson" (it is for "closed")')
        if "rate_per_s" not in table:
            raise ScenarioError(f'{where}.rate_per_s: required when arrival = "poisson"')
        rate_per_s = _number(table, "rate_per_s", where, gt=0.0)
    else:
        _refuse_with(table, "rate_per_s", where, 'arrival = "closed" (it is for "poisson")')
        if "concurrency" not in table:
            raise ScenarioError(f'{where}.concurrency: required when arrival = "closed"')
        concurrency = _integer(table, "concurrency", where, ge=1, le=MAX_CONCURRENCY)
    if kind == "embed":
        _refuse_with(table, "max_new_tokens", where, 'kind = "embed" (embeddings generate no tokens)')
    max_new_tokens = _integer(table, "max_new_tokens", where, default=16, ge=1, le=MAX_NEW_TOKENS)
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
    file = _relative_file(_string(table, "prompts_file", "workload"), base, key, "prompts file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioError(f"{key}: cannot read {file} ({_one_line(error)})") from None
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
    _refuse_unknown(table, SLO_KEYS, "slo")
    if kind == "embed":
        for key in ("ttft_s", "tpot_s"):
            _refuse_with(table, key, "slo", 'kind = "embed" (use latency_s)')
    targets = {key: _number(table, key, "slo", gt=0.0) if key in table else None for key in SLO_KEYS}
    return Slo(**targets)


def _events(value: Any, base: Path, duration_s: float, node_ids: tuple[str, ...]) -> list[Event]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ScenarioError("events: must be an array of tables ([[events]] sections)")
    return [_event(item, f"events[{index}]", base, duration_s, node_ids)
            for index, item in enumerate(value)]  # fmt: skip


def _event(table: Mapping[str, Any], where: str, base: Path, duration_s: float,
           node_ids: tuple[str, ...]) -> Event:  # fmt: skip
    kind = _choice(table, "kind", where, EVENT_KINDS)
    _refuse_unknown(table, ("at_s", "kind", *EVENT_KEYS[kind]), where, f" for kind = {kind!r}")
    at_s = _number(table, "at_s", where, ge=0.0)
    if at_s >= duration_s:
        raise ScenarioError(f"{where}.at_s: must be < duration_s = {duration_s:g} (got {at_s:g})")
    fields: dict[str, Any] = {}
    for key in ("node", "src", "dst"):
        if key in EVENT_KEYS[kind]:
            fields[key] = _node(table, key, where, node_ids)
    if "src" in fields and fields["src"] == fields["dst"]:
        raise ScenarioError(f"{where}.dst: must differ from src ({fields['src']!r})")
    if "one_way" in EVENT_KEYS[kind]:
        fields["one_way"] = _boolean(table, "one_way", where, default=False)
    if kind == "link":
        fields["bandwidth_bytes_per_s"] = _number(table, "bandwidth_bytes_per_s", where, gt=0.0)
        if "latency_s" in table:
            fields["latency_s"] = _number(table, "latency_s", where, ge=0.0)
    elif kind == "link_trace":
        file = _relative_file(_string(table, "file", where), base, f"{where}.file", "trace file")
        fields["trace"] = read_trace(file, f"{where}.file")
    elif kind == "slowdown":
        fields["factor"] = _number(table, "factor", where, ge=1.0, le=MAX_SLOWDOWN)
    elif kind == "privacy":
        fields["private_blocks"] = _integer(table, "private_blocks", where, ge=0)
        fields["trusted_level"] = _integer(table, "trusted_level", where, ge=0)
    return Event(at_s=at_s, kind=cast(EventKind, kind), **fields)


# --- typed values ---------------------------------------------------------------------


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _refuse_unknown(table: Mapping[str, Any], allowed: tuple[str, ...], where: str,
                    context: str = "") -> None:  # fmt: skip
    for key in table:
        if key not in allowed:
            raise ScenarioError(f"{_key(where, key)}: unknown key{context} "
                                f"(allowed: {', '.join(allowed)})")  # fmt: skip


def _refuse_with(table: Mapping[str, Any], key: str, where: str, reason: str) -> None:
    if key in table:
        raise ScenarioError(f"{_key(where, key)}: not allowed with {reason}")


def _table(data: Mapping[str, Any], key: str, where: str, *, required: bool) -> Mapping[str, Any]:
    if key not in data:
        if required:
            raise ScenarioError(f"{_key(where, key)}: required (a [{key}] section)")
        return {}
    if not isinstance(data[key], dict):
        raise ScenarioError(f"{_key(where, key)}: must be a table ([{key}] section)")
    return cast(Mapping[str, Any], data[key])


def _present(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ScenarioError(f"{_key(where, key)}: required")
    return data[key]


def _string(data: Mapping[str, Any], key: str, where: str) -> str:
    value = _present(data, key, where)
    if not isinstance(value, str) or not value.strip():
        raise ScenarioError(f"{_key(where, key)}: must be a non-empty string (got {value!r})")
    return value


def _choice(data: Mapping[str, Any], key: str, where: str, options: tuple[str, ...]) -> str:
    value = _present(data, key, where)
    if value not in options:
        raise ScenarioError(f"{_key(where, key)}: must be one of {', '.join(options)} "
                            f"(got {value!r})")  # fmt: skip
    return cast(str, value)


def _node(data: Mapping[str, Any], key: str, where: str, node_ids: tuple[str, ...]) -> str:
    value = _string(data, key, where)
    if value not in node_ids:
        raise ScenarioError(f"{_key(where, key)}: unknown node {value!r} "
                            f"(topology has {', '.join(node_ids)})")  # fmt: skip
    return value


def _boolean(data: Mapping[str, Any], key: str, where: str, *, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ScenarioError(f"{_key(where, key)}: must be true or false (got {value!r})")
    return value


def _number(data: Mapping[str, Any], key: str, where: str, *, gt: float | None = None,
            ge: float | None = None, le: float | None = None) -> float:  # fmt: skip
    value = _present(data, key, where)
    name = _key(where, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{name}: must be a number (got {value!r})")
    number = float(value)
    if not math.isfinite(number):
        raise ScenarioError(f"{name}: must be a finite number (got {value!r})")
    _check_bounds(name, number, gt=gt, ge=ge, le=le)
    return number


def _integer(data: Mapping[str, Any], key: str, where: str, *, default: int | None = None,
             ge: int | None = None, le: int | None = None) -> int:  # fmt: skip
    if key not in data and default is not None:
        return default
    value = _present(data, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{_key(where, key)}: must be an integer (got {value!r})")
    _check_bounds(_key(where, key), value, ge=ge, le=le)
    return value


def _check_bounds(name: str, value: float, *, gt: float | None = None, ge: float | None = None,
                  le: float | None = None) -> None:  # fmt: skip
    if gt is not None and not value > gt:
        raise ScenarioError(f"{name}: must be > {gt:g} (got {value:g})")
    if ge is not None and not value >= ge:
        raise ScenarioError(f"{name}: must be >= {ge:g} (got {value:g})")
    if le is not None and not value <= le:
        raise ScenarioError(f"{name}: must be <= {le:g} (got {value:g})")
