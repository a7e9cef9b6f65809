"""A minimal TOML writer for the fuzz tests: a decoded tree back to text, as one
top-level key per entry with inline arrays and tables (no TOML writer is installed)."""

from __future__ import annotations

import json
import math
from typing import Any


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value if item is not None) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items() if v is not None)
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def to_toml(document: Any) -> str:
    """TOML text for a map; a non-map becomes the value of key ``value`` (TOML has no
    null: None values are left out)."""
    if not isinstance(document, dict):
        document = {"value": document}
    return "".join(
        f"{json.dumps(str(key))} = {toml_value(value)}\n"
        for key, value in document.items()
        if value is not None
    )
