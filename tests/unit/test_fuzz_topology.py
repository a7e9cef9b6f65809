"""Fuzzing the topology loader (shared/topology.py ``load_topology``) with TOML files:
arbitrary text and bytes, the shipped topologies mutated byte by byte, their decoded
trees edited (wrong types, missing or surplus keys, edge numbers, inf and nan) and
written back as TOML, and hostile shapes (deep nesting, huge integers).

Property: ``load_topology`` returns or raises ConfigError, never anything else, and
what it accepts keeps the topology's invariants: unique node ids, links between two
distinct known nodes, finite positive capacities, trust and speed in range.
Settings: tests/unit/fuzz_profiles.py (10,000 examples with ``CI`` set)."""

from __future__ import annotations

import math
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ConfigError
from shared.ids import validate_id
from shared.topology import DEFAULT_TOPOLOGY, load_topology
from tests.unit.fuzz_profiles import FUZZ
from tests.unit.fuzz_support import mutate_bytes, mutate_tree, trees
from tests.unit.fuzz_toml import to_toml

SHIPPED = tuple(sorted(DEFAULT_TOPOLOGY.parent.glob("*.toml")))
TEXTS = tuple(path.read_bytes() for path in SHIPPED)
TREES = tuple(tomllib.loads(text.decode()) for text in TEXTS)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-topology-") as name:
        yield Path(name)


def _hostile(data: st.DataObject) -> bytes:
    """Shapes random text rarely reaches: nesting past the parser's recursion limit,
    integers past Python's digit limit, and control characters."""
    kind = data.draw(st.sampled_from(["nest", "digits", "control"]), label="hostile")
    size = data.draw(st.integers(1, 3000) if kind == "nest" else st.integers(1, 6000), label="size")
    if kind == "nest":
        return b"nodes = " + b"[" * size + b"]" * size
    if kind == "digits":
        return b"name = 'x'\n[[nodes]]\nid = 'a'\ntrust = " + b"7" * size + b"\nmemory_bytes = 1\n"
    return b"name = '" + bytes(data.draw(st.lists(st.integers(0, 31), max_size=8))) + b"'\n"


def _load_checked(folder: Path, content: bytes) -> None:
    path = folder / "topology.toml"
    path.write_bytes(content)
    try:
        topology = load_topology(path)
    except ConfigError:
        return
    ids = [node.id for node in topology.nodes]
    assert ids and len(set(ids)) == len(ids)
    for node in topology.nodes:
        assert validate_id(node.id) == node.id
        assert 0 <= node.trust <= 10 and 0 < node.speed <= 1 and 1 <= node.threads <= 64
        assert math.isfinite(node.memory_bytes) and node.memory_bytes > 0
    for (src, dst), link in topology.directed_links().items():
        assert src != dst and src in ids and dst in ids and (link.src, link.dst) == (src, dst)
        assert math.isfinite(link.bandwidth_bytes_per_s) and link.bandwidth_bytes_per_s > 0
        assert math.isfinite(link.latency_s) and link.latency_s >= 0
    try:
        entry = topology.entry_node()
    except ConfigError:
        return
    assert entry.id in ids and entry.trust >= topology.trusted_level


@FUZZ
@given(st.data())
def test_fuzz_load_topology(folder: Path, data: st.DataObject) -> None:
    """One of: random text, random bytes, a shipped topology with byte edits, with tree
    edits, or a hostile shape; load_topology raises only ConfigError."""
    source = data.draw(st.sampled_from(["text", "bytes", "edit", "tree", "hostile"]), label="source")
    index = data.draw(st.integers(0, len(TEXTS) - 1), label="shipped")
    if source == "text":
        content = data.draw(st.text(max_size=200), label="text").encode("utf-8", "surrogatepass")
    elif source == "bytes":
        content = data.draw(st.binary(max_size=200), label="bytes")
    elif source == "edit":
        content = mutate_bytes(data, TEXTS[index])
    elif source == "tree":
        edited = mutate_tree(data, TREES[index], trees(allow_bytes=False, tuples=False))
        content = to_toml(edited).encode("utf-8", "surrogatepass")
    else:
        content = _hostile(data)
    _load_checked(folder, content)


# --- regressions: what the fuzzing found ---------------------------------------------------


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"\x80", "not UTF-8 text"),  # was an uncaught UnicodeDecodeError
        (b"nodes = " + b"[" * 5000 + b"]" * 5000, "nest too deeply"),  # was RecursionError
        (b"[[nodes]]\nid = 'a'\ntrust = " + b"7" * 5000 + b"\nmemory_bytes = 1\n",
         "integer string conversion"),  # was ValueError (Python's 4,300-digit limit)
    ],
)  # fmt: skip
def test_undecodable_topology_files_are_config_errors(
    tmp_path: Path, content: bytes, named: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"topology file {path}: .*{named}"):
        load_topology(path)
