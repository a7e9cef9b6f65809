"""Validation errors of a problem file in plain words (``parse_problem``'s messages:
``layers[3].flops: must be a number >= 0``)."""

from __future__ import annotations

from typing import Any

_MESSAGES = {
    "missing": "missing",
    "extra_forbidden": "unknown field",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "model_type": "must be an object",
    "too_short": "must not be empty",
}


def field_path(loc: tuple[Any, ...]) -> str:
    """A validation error's location as the file's path: ``layers[3].flops``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "problem"


def describe(error: dict[str, Any]) -> str:
    """What is wrong with the field, in the words the problem file's errors use."""
    kind, ctx = error["type"], error.get("ctx") or {}
    bounds = {"greater_than_equal": ">=", "greater_than": ">"}
    if kind in bounds:
        limit = ctx.get("ge", ctx.get("gt"))
        noun = "an integer" if isinstance(limit, int) and not isinstance(limit, bool) else "a number"
        return f"must be {noun} {bounds[kind]} {limit:g}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return _MESSAGES.get(kind, str(error["msg"]).lower())
