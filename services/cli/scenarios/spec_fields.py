"""Reading and checking the fields of a scenario file (services/cli/scenarios/spec.py puts them
together into a ``Scenario``; docs/SCENARIOS.md is the contract).

Every check raises ``ScenarioError`` with one line, ``KEY: problem``, KEY being the dotted
path of the key (``workload.rate_per_s``, ``events[2].node``). Numbers must be finite
(TOML allows ``inf`` and ``nan``, scenarios do not); booleans are not numbers.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from shared.errors import ConfigError, UnsupportedArchitecture
from shared.model.config import detect_architecture
from shared.model.prepare import PACKAGED_MODELS
from shared.topology import load_topology

TINY_MODELS: tuple[str, ...] = ("tiny-llama", "tiny-gpt2", "tiny-bert")
PACKAGED_FAMILIES = {"smollm2": "llama", "minilm": "bert"}  # tiny-ARCH: ARCH


class ScenarioError(ConfigError):
    """A scenario file that cannot be run: one line naming the key and the problem."""


def packaged_model_names() -> tuple[str, ...]:
    """Model names a scenario may give instead of a folder (sorted)."""
    return tuple(sorted((*PACKAGED_MODELS, *TINY_MODELS)))


# --- files ----------------------------------------------------------------------------


def read_toml(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{file}: scenario file does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ScenarioError(f"{file}: cannot read the scenario file ({one_line(error)})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:  # its message ends "(at line N, column M)"
        raise ScenarioError(f"{file}: not valid TOML: {one_line(error)}") from None


def relative_file(value: str, base: Path, key: str, what: str) -> Path:
    file = (base / value).resolve()
    if not file.is_file():
        raise ScenarioError(f"{key}: {what} {file} does not exist")
    return file


def topology_nodes(data: Mapping[str, Any], base: Path) -> tuple[Path, tuple[str, ...]]:
    file = relative_file(text(data, "topology", ""), base, "topology", "topology file")
    try:
        topology = load_topology(file)
    except ConfigError as error:
        raise ScenarioError(f"topology: {one_line(error)}") from None
    return file, tuple(node.id for node in topology.nodes)


def model_and_family(data: Mapping[str, Any], base: Path) -> tuple[str, str | None]:
    """The model (a packaged name, or an absolute folder) and its family (None: unknown)."""
    value = text(data, "model", "")
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
        raise ScenarioError(f"model: {config} is not a readable JSON object ({one_line(error)})") from None
    except UnsupportedArchitecture as error:
        raise ScenarioError(f"model: {config}: {one_line(error)}") from None
    return str(folder), family


def check_model_fits(kind: str, model: str, family: str | None) -> None:
    """Embeddings need an encoder (BERT), generation a decoder (GPT-2, Llama)."""
    if family is None or (kind == "embed") == (family == "bert"):
        return
    if kind == "embed":
        raise ScenarioError(f'workload.kind: "embed" needs a BERT encoder (minilm, tiny-bert or a '
                            f"BERT folder); model {model} is a {family} decoder")  # fmt: skip
    raise ScenarioError(f'workload.kind: "generate" needs a decoder (smollm2, tiny-llama, tiny-gpt2 '
                        f"or a GPT-2/Llama folder); model {model} is a BERT encoder")  # fmt: skip


# --- typed values ---------------------------------------------------------------------


def dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def refuse_unknown(table: Mapping[str, Any], allowed: tuple[str, ...], where: str,
                    context: str = "") -> None:  # fmt: skip
    for key in table:
        if key not in allowed:
            raise ScenarioError(f"{dotted(where, key)}: unknown key{context} "
                                f"(allowed: {', '.join(allowed)})")  # fmt: skip


def refuse_with(table: Mapping[str, Any], key: str, where: str, reason: str) -> None:
    if key in table:
        raise ScenarioError(f"{dotted(where, key)}: not allowed with {reason}")


def section(data: Mapping[str, Any], key: str, where: str, *, required: bool) -> Mapping[str, Any]:
    if key not in data:
        if required:
            raise ScenarioError(f"{dotted(where, key)}: required (a [{key}] section)")
        return {}
    if not isinstance(data[key], dict):
        raise ScenarioError(f"{dotted(where, key)}: must be a table ([{key}] section)")
    return cast(Mapping[str, Any], data[key])


def required(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ScenarioError(f"{dotted(where, key)}: required")
    return data[key]


def text(data: Mapping[str, Any], key: str, where: str) -> str:
    value = required(data, key, where)
    if not isinstance(value, str) or not value.strip():
        raise ScenarioError(f"{dotted(where, key)}: must be a non-empty string (got {value!r})")
    return value


def choice(data: Mapping[str, Any], key: str, where: str, options: tuple[str, ...]) -> str:
    value = required(data, key, where)
    if value not in options:
        raise ScenarioError(f"{dotted(where, key)}: must be one of {', '.join(options)} "
                            f"(got {value!r})")  # fmt: skip
    return cast(str, value)


def node_name(data: Mapping[str, Any], key: str, where: str, node_ids: tuple[str, ...]) -> str:
    value = text(data, key, where)
    if value not in node_ids:
        raise ScenarioError(f"{dotted(where, key)}: unknown node {value!r} "
                            f"(topology has {', '.join(node_ids)})")  # fmt: skip
    return value


def flag(data: Mapping[str, Any], key: str, where: str, *, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ScenarioError(f"{dotted(where, key)}: must be true or false (got {value!r})")
    return value


def number(data: Mapping[str, Any], key: str, where: str, *, gt: float | None = None,
            ge: float | None = None, le: float | None = None) -> float:  # fmt: skip
    value = required(data, key, where)
    name = dotted(where, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{name}: must be a number (got {value!r})")
    result = float(value)
    if not math.isfinite(result):
        raise ScenarioError(f"{name}: must be a finite number (got {value!r})")
    check_bounds(name, result, gt=gt, ge=ge, le=le)
    return result


def integer(data: Mapping[str, Any], key: str, where: str, *, default: int | None = None,
             ge: int | None = None, le: int | None = None) -> int:  # fmt: skip
    if key not in data and default is not None:
        return default
    value = required(data, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{dotted(where, key)}: must be an integer (got {value!r})")
    check_bounds(dotted(where, key), value, ge=ge, le=le)
    return value


def check_bounds(name: str, value: float, *, gt: float | None = None, ge: float | None = None,
                  le: float | None = None) -> None:  # fmt: skip
    if gt is not None and not value > gt:
        raise ScenarioError(f"{name}: must be > {gt:g} (got {value:g})")
    if ge is not None and not value >= ge:
        raise ScenarioError(f"{name}: must be >= {ge:g} (got {value:g})")
    if le is not None and not value <= le:
        raise ScenarioError(f"{name}: must be <= {le:g} (got {value:g})")
