"""Topology files: the emulated edge site (nodes, their trust and capacity, and links).

A topology is TOML (see deploy/topologies/). This is *emulation* on one machine: each
worker applies its node's speed as a compute slowdown and shapes its egress per
destination (bandwidth and added latency); nothing here changes the real network.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ConfigError
from shared.ids import TopicId
from shared.messages import PrivacyPolicy

_CHECKOUT_TOPOLOGY = Path(__file__).resolve().parent.parent / "deploy" / "topologies" / "default.toml"
DEFAULT_TOPOLOGY = (_CHECKOUT_TOPOLOGY if _CHECKOUT_TOPOLOGY.is_file()
                    else Path(__file__).resolve().parent / "packaged" / "default.toml")  # fmt: skip
"""deploy/topologies/default.toml; in an installed package (no deploy/), the copy that
ships in shared/packaged/ (a link to it in the checkout)."""


class TopologyNode(BaseModel):
    """One emulated edge node."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    id: TopicId
    trust: int = Field(ge=0, le=10, description="trust level; higher is more trusted")
    memory_bytes: float = Field(gt=0, description="memory free for model blocks, bytes")
    speed: float = Field(
        default=1.0, gt=0, le=1.0, description="fraction of this machine's compute speed emulated"
    )
    threads: int = Field(default=1, ge=1, le=64, description="torch threads for its compute")
    entry: bool = Field(default=False, description="preferred entry node (must be trusted)")

    @property
    def slowdown(self) -> float:
        """Compute slowdown factor applied by the worker (1 / speed)."""
        return 1.0 / self.speed


class TopologyLink(BaseModel):
    """A directed link; `symmetric` adds the reverse direction with the same numbers."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    src: TopicId
    dst: TopicId
    bandwidth_bytes_per_s: float = Field(gt=0)
    latency_s: float = Field(default=0.0, ge=0)
    symmetric: bool = True


class Topology(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = "topology"
    private_blocks: int = Field(
        default=1, ge=0, le=65_536,
        description="the first k blocks run only on nodes with trust >= trusted_level",
    )
    trusted_level: int = Field(default=2, ge=0, le=1_000)
    nodes: tuple[TopologyNode, ...]
    links: tuple[TopologyLink, ...] = ()

    @model_validator(mode="after")
    def _check_references(self) -> Topology:
        ids = [node.id for node in self.nodes]
        if not ids:
            raise ValueError("nodes: at least one node is required")
        if len(set(ids)) != len(ids):
            raise ValueError(f"nodes: duplicate node ids in {ids}")
        for index, link in enumerate(self.links):
            for end in ("src", "dst"):
                if getattr(link, end) not in ids:
                    raise ValueError(f"links[{index}].{end}: unknown node {getattr(link, end)!r}")
            if link.src == link.dst:
                raise ValueError(f"links[{index}]: a link needs two different nodes")
        return self

    def node(self, node_id: str) -> TopologyNode:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise ConfigError(f"node {node_id!r} is not in topology {self.name!r}")

    def privacy_policy(self) -> PrivacyPolicy:
        """The site's privacy policy (the launcher publishes it; workers start under it)."""
        return PrivacyPolicy(trusted_level=self.trusted_level, private_blocks=self.private_blocks)

    def directed_links(self) -> dict[tuple[str, str], TopologyLink]:
        """Every directed link, the reverse of symmetric ones included (explicit wins)."""
        links: dict[tuple[str, str], TopologyLink] = {}
        for link in self.links:
            if link.symmetric:
                links.setdefault(
                    (link.dst, link.src),
                    link.model_copy(update={"src": link.dst, "dst": link.src, "symmetric": False}),
                )
        for link in self.links:
            links[(link.src, link.dst)] = link
        return dict(sorted(links.items()))

    def entry_node(self) -> TopologyNode:
        """The entry: the node marked `entry`, else the most trusted (then fastest, then id)."""
        marked = [node for node in self.nodes if node.entry]
        if len(marked) > 1:
            raise ConfigError(f"topology {self.name!r}: more than one node has entry = true")
        candidates = marked or sorted(self.nodes, key=lambda n: (-n.trust, -n.speed, n.id))
        entry = candidates[0]
        if entry.trust < self.trusted_level:
            raise ConfigError(
                f"topology {self.name!r}: entry node {entry.id!r} has trust {entry.trust}, "
                f"below trusted_level {self.trusted_level}"
            )
        return entry


def load_topology(path: Path | str | None = None) -> Topology:
    """Read a TOML topology file (the shipped default when ``path`` is None).

    Raises ConfigError naming the file and the bad field (or, for a file that is no
    TOML, not UTF-8, nests too deeply or holds an integer too long to convert, what is
    wrong with it).
    """
    file = Path(path) if path is not None else DEFAULT_TOPOLOGY
    try:
        data = tomllib.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"topology file {file} does not exist") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"topology file {file}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise ConfigError(f"topology file {file}: arrays or tables nest too deeply") from None
    except (OSError, ValueError) as error:  # TOMLDecodeError, or an integer of 4,300+ digits
        raise ConfigError(f"topology file {file}: {error}") from None
    data.setdefault("name", file.stem)
    try:
        return Topology.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ConfigError(f"topology file {file}: {where}: {first['msg']}") from None
