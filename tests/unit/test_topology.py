"""Topology files: the shipped ones load; numbers that are not finite are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.topology import DEFAULT_TOPOLOGY, load_topology

SITE = """
name = "site"
[[nodes]]
id = "a"
trust = 2
memory_bytes = {memory}
speed = {speed}
entry = true

[[nodes]]
id = "b"
trust = 0
memory_bytes = 1e9

[[links]]
src = "a"
dst = "b"
bandwidth_bytes_per_s = {bandwidth}
latency_s = {latency}
"""
GOOD = {"memory": "4e8", "speed": "0.5", "bandwidth": "1e6", "latency": "0.01"}


def _write(tmp_path: Path, **changes: str) -> Path:
    file = tmp_path / "site.toml"
    file.write_text(SITE.format(**{**GOOD, **changes}))
    return file


def test_the_shipped_topologies_load() -> None:
    for file in sorted(DEFAULT_TOPOLOGY.parent.glob("*.toml")):
        assert load_topology(file).nodes


def test_finite_positive_numbers_load(tmp_path: Path) -> None:
    topology = load_topology(_write(tmp_path))
    assert topology.node("a").memory_bytes == 4e8
    assert topology.directed_links()[("b", "a")].latency_s == 0.01


@pytest.mark.parametrize("value", ["inf", "+inf", "-inf", "nan", "-nan"])
@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("memory", "nodes.0.memory_bytes"),
        ("speed", "nodes.0.speed"),
        ("bandwidth", "links.0.bandwidth_bytes_per_s"),
        ("latency", "links.0.latency_s"),
    ],
)
def test_numbers_that_are_not_finite_are_refused_naming_the_key(
    tmp_path: Path, key: str, where: str, value: str
) -> None:
    file = _write(tmp_path, **{key: value})
    with pytest.raises(ConfigError) as caught:
        load_topology(file)
    message = str(caught.value)
    assert message.startswith(f"topology file {file}: {where}: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("key", "value", "where"),
    [
        ("memory", "0", "nodes.0.memory_bytes"),
        ("memory", "-1e9", "nodes.0.memory_bytes"),
        ("speed", "0", "nodes.0.speed"),
        ("bandwidth", "0", "links.0.bandwidth_bytes_per_s"),
        ("latency", "-0.5", "links.0.latency_s"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_key(
    tmp_path: Path, key: str, value: str, where: str
) -> None:
    with pytest.raises(ConfigError, match=f": {where}: "):
        load_topology(_write(tmp_path, **{key: value}))
