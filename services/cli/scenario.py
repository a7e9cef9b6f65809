"""`edgesplit scenario run FILE [--policy all|LIST] [--out DIR]` (docs/SCENARIOS.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from shared.process import first_edgesplit_error


def register(subparsers: Any) -> None:
    """Add the ``scenario`` sub-command."""
    parser = subparsers.add_parser(
        "scenario", help="run a scenario under each policy and report them side by side",
        description="Scenarios: measured runs of the static, migrate and adaptive policies on "
                    "fresh local stacks with the same seeded workload and timed events.")  # fmt: skip
    actions = parser.add_subparsers(dest="action", metavar="ACTION", parser_class=type(parser))
    actions.required = True
    run = actions.add_parser(
        "run", help="run FILE under each policy and write report.json, report.md and plots",
        description="Run a scenario file (TOML, docs/SCENARIOS.md) once per policy, each on a "
                    "fresh stack with its own broker, and write DIR/report.json, DIR/report.md "
                    "and DIR/*.png. Ctrl-C stops cleanly and still writes what was measured.")  # fmt: skip
    run.add_argument("file", type=Path, metavar="FILE", help="the scenario file (TOML)")
    run.add_argument("--policy", default="all", metavar="LIST",
                     help="all (default: static,migrate,adaptive) or a comma-separated subset of "
                          "static,migrate,adaptive,compressed (compressed: adaptive with each hop's "
                          "activation precision chosen by the planner)")  # fmt: skip
    run.add_argument("--time-scale", type=float, default=1.0, metavar="F",
                     help="multiply the duration and every event time by F (e.g. 0.5: half as long)")  # fmt: skip
    run.add_argument("--out", type=Path, metavar="DIR",
                     help="where the report goes (default reports/NAME)")  # fmt: skip
    run.set_defaults(handler=run_scenario_command)


def run_scenario_command(args: argparse.Namespace) -> int:
    """Handler of ``scenario run``: a bad file or option is one line and exit 2."""
    from services.cli.scenarios.runner import (
        describe_args,
        policies_from,
        run_scenario,
        say,
        summary,
    )
    from services.cli.scenarios.spec import ScenarioError, load_scenario, time_scaled

    try:
        scenario = load_scenario(args.file)
        if args.time_scale != 1.0:
            scenario = time_scaled(scenario, args.time_scale)
        policies = policies_from(args.policy)
    except ScenarioError as error:
        print(f"edgesplit: {error}", file=sys.stderr)
        return 2
    out_dir = args.out or Path("reports") / scenario.name
    try:
        report, runs = asyncio.run(run_scenario(scenario, policies, out_dir, describe_args(sys.argv[1:])))
    except BaseExceptionGroup as group:
        found = first_edgesplit_error(group)
        if found is None:
            raise
        raise found from None
    for line in summary(runs):
        say(line)
    print(f"report: {report}", flush=True)
    return 0
