"""`edgesplit emulate`: argument parsing and validation, the command it builds, its output.

No broker here: bad values must fail before any connection (port 1 never answers, so a
connection attempt would show as a broker error instead).
"""

from __future__ import annotations

import argparse

import pytest

from services.cli import build_parser, main
from services.cli.emulate import (
    Changes,
    LinkChange,
    changes_from_args,
    describe,
    parse_bandwidth,
    parse_latency,
)
from shared.messages import EmulatedLink, EmulationApplied

NO_BROKER = "mqtt://127.0.0.1:1"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["emulate", *argv])


@pytest.mark.parametrize(
    ("text", "bytes_per_s"),
    [("50k", 50e3), ("50K", 50e3), ("1.5M", 1.5e6), ("2G", 2e9), ("1250000", 1.25e6),
     ("1e6", 1e6), ("0.5", 0.5)],
)  # fmt: skip
def test_bandwidth_takes_decimal_suffixes(text: str, bytes_per_s: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize(
    ("text", "seconds"), [("0.01", 0.01), ("10ms", 0.01), ("0", 0.0), ("2s", 2.0), ("60", 60.0)]
)
def test_latency_in_seconds_or_milliseconds(text: str, seconds: float) -> None:
    assert parse_latency(text) == pytest.approx(seconds)


def test_options_become_one_command() -> None:
    args = parse("car", "--slowdown", "4", "--link", "mec:250k:0.01", "--link", "rsu:1.5M",
                 "--unshape", "cloud", "--noise", "0.1", "--timeout", "2", "--json")  # fmt: skip
    changes = changes_from_args(args)
    assert args.node == "car" and args.timeout == 2.0 and args.json
    assert changes == Changes(
        slowdown=4.0,
        links=(LinkChange("mec", 250e3, 0.01), LinkChange("rsu", 1.5e6, None),
               LinkChange("cloud", None, 0.0)),
        reset_links=False,
        noise=0.1,
    )  # fmt: skip
    current = EmulationApplied(
        node="car", command_id=7, slowdown=2.0,  # type: ignore[arg-type]
        links=(EmulatedLink(dst="rsu", bandwidth_bytes_per_s=12.5e6, latency_s=0.002),),  # type: ignore[arg-type]
    )  # fmt: skip
    command = changes.command(8, current)
    assert command.command_id == 8 and command.slowdown == 4.0 and command.noise == 0.1
    assert not command.reset_links
    assert command.links == (  # rsu without a latency keeps the one it has
        EmulatedLink(dst="mec", bandwidth_bytes_per_s=250e3, latency_s=0.01),  # type: ignore[arg-type]
        EmulatedLink(dst="rsu", bandwidth_bytes_per_s=1.5e6, latency_s=0.002),  # type: ignore[arg-type]
        EmulatedLink(dst="cloud", bandwidth_bytes_per_s=None, latency_s=0.0),  # type: ignore[arg-type]
    )


def test_options_left_out_keep_their_value() -> None:
    args = parse("rsu")
    assert args.timeout == 5.0 and not args.json
    command = changes_from_args(args).command(1, None)
    assert command.slowdown is None and command.noise is None
    assert command.links == () and not command.reset_links


def test_reset_links_does_not_keep_old_latencies() -> None:
    current = EmulationApplied(
        node="car", command_id=3, slowdown=1.0,  # type: ignore[arg-type]
        links=(EmulatedLink(dst="mec", bandwidth_bytes_per_s=2.5e6, latency_s=0.01),),  # type: ignore[arg-type]
    )  # fmt: skip
    command = changes_from_args(parse("car", "--reset-links", "--link", "mec:1M")).command(
        4, current
    )
    assert command.reset_links
    assert command.links == (EmulatedLink(dst="mec", bandwidth_bytes_per_s=1e6, latency_s=0.0),)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["car", "--slowdown", "0.5"], "--slowdown"),
        (["car", "--slowdown", "nan"], "--slowdown"),
        (["car", "--slowdown", "2000"], "--slowdown"),
        (["car", "--noise", "0.7"], "--noise"),
        (["car", "--timeout", "0"], "--timeout"),
        (["car", "--link", "mec"], "DST:BANDWIDTH"),
        (["car", "--link", "mec:1k:2:3"], "DST:BANDWIDTH"),
        (["car", "--link", "mec:fast"], "bandwidth"),
        (["car", "--link", "mec:0"], "bandwidth"),
        (["car", "--link", "mec:-5k"], "bandwidth"),
        (["car", "--link", "mec:inf"], "bandwidth"),
        (["car", "--link", "mec:1k:-1"], "latency"),
        (["car", "--link", "mec:1k:61"], "latency"),
        (["car", "--link", "m/ec:1k"], "node id"),
        (["car", "--unshape", "#"], "node id"),
        (["a/b", "--slowdown", "2"], "node id"),
        (["car", "--cluster", "a+b"], "cluster id"),
        (["car", "--link", "car:1k"], "itself"),
        (["car", "--link", "mec:1k", "--link", "mec:2k"], "more than once"),
        (["car", "--link", "mec:1k", "--unshape", "mec"], "more than once"),
        (["car", "--broker", "http://x"], "broker"),
        (["--slowdown", "2"], "NODE"),
    ],
)
def test_bad_values_are_one_line_exit_2_before_connecting(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    broker = [] if "--broker" in argv else ["--broker", NO_BROKER]
    with pytest.raises(SystemExit) as exit_:
        main(["emulate", *argv, *broker])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("edgesplit: error:") and message in err
    assert "Traceback" not in err and "no MQTT broker" not in err


def test_no_broker_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGESPLIT_CONNECT_TIMEOUT_S", "0.3")
    assert main(["emulate", "car", "--slowdown", "2", "--broker", NO_BROKER]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "no MQTT broker" in err and "Traceback" not in err


def test_describe_is_one_line_of_what_the_node_applies() -> None:
    applied = EmulationApplied(
        node="car", command_id=4, slowdown=4.0, noise=0.1,  # type: ignore[arg-type]
        links=(EmulatedLink(dst="mec", bandwidth_bytes_per_s=250e3, latency_s=0.01),  # type: ignore[arg-type]
               EmulatedLink(dst="rsu", bandwidth_bytes_per_s=None, latency_s=0.0)),  # type: ignore[arg-type]
    )  # fmt: skip
    assert describe(applied) == (
        "car: slowdown 4x, noise +-10%; links: mec 250 kB/s + 10 ms, rsu unshaped (command 4)"
    )
    bare = EmulationApplied(node="rsu", command_id=0, slowdown=1.0)  # type: ignore[arg-type]
    assert describe(bare) == "rsu: slowdown 1x; links: none shaped (command 0)"
