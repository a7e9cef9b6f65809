"""`edgesplit emulate NODE`: change a running worker's emulated compute and links by hand.

This is *emulation* (docs/EMULATION.md): the command publishes one `EmulationCommand` on
``nodes/{node}/emulation``, the same message scenarios and tests send, and waits for the
worker's retained `EmulationApplied` acknowledgement of it:

1. read the node's retained `EmulationApplied` (its current state and ``command_id``);
2. publish the changes with ``command_id`` one larger;
3. wait for the `EmulationApplied` carrying that id and print it.

Every value is checked before connecting (a bad one is one line, exit 2). A node that
never published its state, or does not confirm within ``--timeout``, is a one-line
`NoAnswer` (exit 1). Options left out keep their current value; a link given without a
latency keeps the latency the node applies to that destination now.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import ValidationError

from shared.bus import Bus
from shared.config import BusSettings, load_settings
from shared.errors import ConfigError, InvalidId, NoAnswer
from shared.ids import validate_id
from shared.messages import EmulatedLink, EmulationApplied, EmulationCommand
from shared.process import first_edgesplit_error
from shared.topics import EMULATION, EMULATION_STATE

DEFAULT_TIMEOUT_S = 5.0
MAX_SLOWDOWN = 1000.0
MAX_LATENCY_S = 60.0
MAX_NOISE = 0.5
_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}


# --- values (argparse types: a bad one is one line, exit 2, before connecting) -------------


def _number(text: str, what: str, shown: str | None = None) -> float:
    """``float(text)``, finite; the error quotes ``shown`` (the whole value) when given."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{what} is not a finite number: {(shown or text)!r}")
    return value


def parse_bandwidth(text: str) -> float:
    """Bytes/s, with an optional decimal suffix: ``50k`` = 50e3, ``1.5M`` = 1.5e6, ``2G``."""
    body, multiplier = text.strip(), 1.0
    if body and body[-1].lower() in _SUFFIXES:
        body, multiplier = body[:-1], _SUFFIXES[body[-1].lower()]
    value = _number(body, "bandwidth", text) * multiplier
    if value <= 0:
        raise argparse.ArgumentTypeError(f"bandwidth must be > 0 bytes/s: {text!r}")
    return value


def parse_latency(text: str) -> float:
    """Seconds (``0.01``), or milliseconds with ``ms`` (``10ms``); 0 to 60 s."""
    body = text.strip()
    scale = 1e-3 if body.endswith("ms") else 1.0
    body = body.removesuffix("ms").removesuffix("s")
    value = _number(body, "latency", text) * scale
    if not 0 <= value <= MAX_LATENCY_S:
        raise argparse.ArgumentTypeError(f"latency must be 0 to {MAX_LATENCY_S:g} s: {text!r}")
    return value


@dataclass(frozen=True)
class LinkChange:
    """One destination's new shape: bandwidth (None: unshaped), latency (None: keep current)."""

    dst: str
    bandwidth_bytes_per_s: float | None
    latency_s: float | None = None


def parse_link(text: str) -> LinkChange:
    """``DST:BANDWIDTH[:LATENCY]``, e.g. ``mec:250k`` or ``mec:250k:0.01``."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"expected DST:BANDWIDTH[:LATENCY_S] (e.g. mec:250k:0.01), got {text!r}"
        )
    dst = _node(parts[0])
    latency = parse_latency(parts[2]) if len(parts) == 3 else None
    return LinkChange(dst, parse_bandwidth(parts[1]), latency)


def _unshape(text: str) -> LinkChange:
    return LinkChange(_node(text), None, 0.0)


def _node(text: str) -> str:
    try:
        return validate_id(text, "node id")
    except InvalidId as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _cluster(text: str) -> str:
    try:
        return validate_id(text, "cluster id")
    except InvalidId as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _slowdown(text: str) -> float:
    value = _number(text, "slowdown")
    if not 1 <= value <= MAX_SLOWDOWN:
        raise argparse.ArgumentTypeError(
            f"slowdown must be 1 (full speed) to {MAX_SLOWDOWN:g}: {text!r}"
        )
    return value


def _noise(text: str) -> float:
    value = _number(text, "noise")
    if not 0 <= value <= MAX_NOISE:
        raise argparse.ArgumentTypeError(f"noise must be 0 to {MAX_NOISE}: {text!r}")
    return value


def _timeout(text: str) -> float:
    value = _number(text, "timeout")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"timeout must be > 0 seconds: {text!r}")
    return value


# --- the changes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Changes:
    """What to change on one node; None and empty keep the node's current value."""

    slowdown: float | None = None
    links: tuple[LinkChange, ...] = ()
    reset_links: bool = False
    noise: float | None = None

    def command(self, command_id: int, current: EmulationApplied | None) -> EmulationCommand:
        """The command to send; a link's missing latency comes from ``current``."""
        kept: dict[str, float] = {}
        if current is not None and not self.reset_links:
            kept = {str(link.dst): link.latency_s for link in current.links}
        links = tuple(
            EmulatedLink(
                dst=change.dst,  # type: ignore[arg-type]
                bandwidth_bytes_per_s=change.bandwidth_bytes_per_s,
                latency_s=change.latency_s if change.latency_s is not None else kept.get(change.dst, 0.0),
            )
            for change in self.links
        )  # fmt: skip
        return EmulationCommand(command_id=command_id, slowdown=self.slowdown, links=links,
                                reset_links=self.reset_links, noise=self.noise)  # fmt: skip


def changes_from_args(args: argparse.Namespace) -> Changes:
    """The parsed options as `Changes`; ConfigError for options that contradict each other."""
    links: list[LinkChange] = [*args.link, *args.unshape]
    seen: set[str] = set()
    for link in links:
        if link.dst == args.node:
            raise ConfigError(
                f"node {args.node} has no link to itself (--link/--unshape {link.dst})"
            )
        if link.dst in seen:
            raise ConfigError(f"link to {link.dst} given more than once (--link/--unshape)")
        seen.add(link.dst)
    changes = Changes(args.slowdown, tuple(links), args.reset_links, args.noise)
    try:
        changes.command(0, None)  # every bound the message has, checked before connecting
    except ValidationError as error:
        first = error.errors()[0]
        raise ConfigError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    return changes


# --- the exchange with the node -------------------------------------------------------------


async def emulate(settings: BusSettings, node: str, changes: Changes,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> EmulationApplied:  # fmt: skip
    """Send ``changes`` to ``node`` and return its acknowledgement.

    Raises NoAnswer when the node has no retained state or does not confirm within
    ``timeout_s`` (after connecting), BrokerUnavailable when no broker answers.
    """
    async with Bus(settings) as bus, bus.subscribe(EMULATION_STATE, node=node) as states:
        where = f"cluster {bus.cluster!r} at {bus.url}"
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                current = (await states.get()).message
        except TimeoutError:
            raise NoAnswer(
                f"node {node} has published no emulation state on {where} within {timeout_s:g} s; "
                "is its worker running, with the same --broker and --cluster?"
            ) from None
        command = changes.command(current.command_id + 1, current)
        await bus.publish(EMULATION, command, node=node)
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    applied = (await states.get()).message
                    if applied.command_id == command.command_id:
                        return applied
        except TimeoutError:
            raise NoAnswer(
                f"node {node} did not confirm emulation command {command.command_id} within "
                f"{timeout_s:g} s on {where}; it may not be running (its retained state, "
                f"command {current.command_id}, can be left from an earlier run)"
            ) from None


def describe(applied: EmulationApplied) -> str:
    """One line: what the node applies now."""
    links = ", ".join(
        f"{link.dst} {_rate(link.bandwidth_bytes_per_s)}"
        + (f" + {link.latency_s * 1e3:g} ms" if link.latency_s else "")
        for link in applied.links
    )  # fmt: skip
    noise = f", noise +-{applied.noise:.0%}" if applied.noise else ""
    return (f"{applied.node}: slowdown {applied.slowdown:g}x{noise}; links: {links or 'none shaped'} "
            f"(command {applied.command_id})")  # fmt: skip


def _rate(bandwidth_bytes_per_s: float | None) -> str:
    if bandwidth_bytes_per_s is None:
        return "unshaped"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bandwidth_bytes_per_s >= scale:
            return f"{bandwidth_bytes_per_s / scale:.4g} {unit}"
    return f"{bandwidth_bytes_per_s:.4g} B/s"


# --- the command ----------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add the ``emulate`` sub-command."""
    parser = subparsers.add_parser(
        "emulate", help="change a running worker's emulated slowdown and links",
        description="Change the emulated compute slowdown and egress link shaping of a running "
                    "worker (this is emulation, docs/EMULATION.md) and print what it applies "
                    "once it confirms. Options left out keep their current value; with none, "
                    "the node only confirms and prints its current state.")  # fmt: skip
    parser.add_argument("node", type=_node, metavar="NODE", help="the worker's node id")
    parser.add_argument("--slowdown", type=_slowdown, metavar="F",
                        help="compute slowdown factor, 1 (full speed) to 1000")  # fmt: skip
    parser.add_argument("--link", type=parse_link, action="append", default=[],
                        metavar="DST:BANDWIDTH[:LATENCY_S]",
                        help="shape the link to DST: bytes/s with an optional k/M/G suffix "
                             "(decimal), latency in s or with ms (kept when left out); repeatable")  # fmt: skip
    parser.add_argument("--unshape", type=_unshape, action="append", default=[], metavar="DST",
                        help="make the link to DST unshaped (no bandwidth limit, no latency); repeatable")  # fmt: skip
    parser.add_argument("--reset-links", action="store_true",
                        help="unshape every link first (then apply --link)")  # fmt: skip
    parser.add_argument("--noise", type=_noise, metavar="F",
                        help="random +-fraction on the slowdown and every shaped link, 0 to 0.5")  # fmt: skip
    parser.add_argument(
        "--broker", help="broker URL (default $EDGESPLIT_BROKER_URL or mqtt://127.0.0.1:1883)"
    )
    parser.add_argument("--cluster", type=_cluster, help="cluster id (default 'default')")
    parser.add_argument(
        "--json", action="store_true", help="print the node's EmulationApplied as JSON"
    )
    parser.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"how long to wait for the node after connecting (default {DEFAULT_TIMEOUT_S:g} s)")  # fmt: skip
    parser.set_defaults(handler=run_emulate, emulate_parser=parser)


def run_emulate(args: argparse.Namespace) -> int:
    """Handler of ``emulate``."""
    try:
        changes = changes_from_args(args)
        settings = load_settings(BusSettings, {"broker_url": args.broker, "cluster": args.cluster})
    except ConfigError as error:
        _usage_error(args, str(error))
    try:
        applied = asyncio.run(emulate(settings, args.node, changes, args.timeout))
    except BaseExceptionGroup as group:
        found = first_edgesplit_error(group)
        if found is None:
            raise
        raise found from None
    print(json.dumps(applied.model_dump(mode="json")) if args.json else describe(applied))
    return 0


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """One line on stderr and exit status 2, as for any bad argument."""
    args.emulate_parser.error(message)
    raise SystemExit(2)  # the parser exits; this only tells the type checker
