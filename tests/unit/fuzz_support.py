"""Strategies shared by the decoder fuzz tests: hostile leaf values, and mutations of a
valid document (its bytes, or its decoded tree) so the fuzzing reaches past the parser
into each decoder's validation."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from hypothesis import strategies as st

EDGE_INTS = st.sampled_from(
    [0, 1, -1, 2, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**64 - 1]
)
EDGE_FLOATS = st.sampled_from(
    [0.0, -0.0, 0.5, -1.0, 1e-320, 1e308, float("inf"), float("-inf"), float("nan")]
)
EDGE_TEXT = st.sampled_from(
    ["", "a", "a/b", "+", "#", "..", "../x", "x" * 65, "\x00", "é", "manifest.json", "kind"]
)


@cache  # one strategy object per variant: building one per example is slow
def scalars(*, allow_bytes: bool = True) -> st.SearchStrategy[Any]:
    """Any scalar a msgpack or JSON document may hold, weighted to edge values."""
    options = [
        st.none(),
        st.booleans(),
        EDGE_INTS,
        st.integers(-(2**64), 2**64),
        EDGE_FLOATS,
        st.floats(),
        EDGE_TEXT,
        st.text(max_size=24),
    ]
    if allow_bytes:
        options.append(st.binary(max_size=24))
    return st.one_of(options)


@cache
def trees(*, allow_bytes: bool = True, tuples: bool = True) -> st.SearchStrategy[Any]:
    """A scalar (three times in four) or nested lists (or tuples) and str-keyed maps of
    ``scalars``."""
    leaf = scalars(allow_bytes=allow_bytes)
    keys = st.one_of(EDGE_TEXT, st.text(max_size=12))

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        seq = st.lists(children, max_size=4)
        return st.one_of(seq.map(tuple) if tuples else seq, st.dictionaries(keys, children, max_size=4))

    nested = st.recursive(leaf, extend, max_leaves=8)
    return st.one_of(leaf, leaf, leaf, nested)


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path from the root to a node of ``tree`` (the root is ``()``)."""
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(tree, list | tuple):
        for index, value in enumerate(tree):
            found.extend(_paths(value, (*prefix, index)))
    return found


def _thaw(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _thaw(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [_thaw(value) for value in tree]
    return tree


def mutate_tree(data: st.DataObject, tree: Any, values: st.SearchStrategy[Any]) -> Any:
    """A copy of ``tree`` (decoded msgpack/JSON/TOML) with 1-3 random edits: a node
    replaced by a drawn value, a map key removed or added, a list item removed or
    duplicated."""
    tree = _thaw(copy.deepcopy(tree))
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = _paths(tree)
        path = data.draw(st.sampled_from(paths), label="path")
        if not path:
            tree = _thaw(data.draw(values, label="root"))
            continue
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = data.draw(st.sampled_from(["replace", "remove", "add", "copy"]), label="action")
        if action == "replace":
            parent[key] = _thaw(data.draw(values, label="value"))
        elif action == "remove":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.one_of(EDGE_TEXT, st.text(max_size=8)), label="key")] = _thaw(
                data.draw(values, label="value")
            )
        elif isinstance(parent, list):  # add or copy within a list: duplicate an item
            parent.insert(key, copy.deepcopy(parent[key]))
        elif isinstance(parent, dict) and parent:  # copy: one key's value onto another
            other = data.draw(st.sampled_from(sorted(parent, key=str)), label="other")
            parent[key] = copy.deepcopy(parent[other])
    return tree


def mutate_bytes(data: st.DataObject, blob: bytes) -> bytes:
    """``blob`` with 1-4 byte-level edits: overwrite, bit flip, insert, delete, truncate."""
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4), label="byte edits")):
        action = data.draw(
            st.sampled_from(["set", "flip", "insert", "delete", "truncate"]), label="byte action"
        )
        if not out:
            out += data.draw(st.binary(min_size=1, max_size=8), label="bytes")
            continue
        at = data.draw(st.integers(0, len(out) - 1), label="at")
        if action == "set":
            out[at] = data.draw(st.integers(0, 255), label="byte")
        elif action == "flip":
            out[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif action == "insert":
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
        elif action == "delete":
            del out[at : at + data.draw(st.integers(1, 8), label="length")]
        else:
            del out[at:]
    return bytes(out)
