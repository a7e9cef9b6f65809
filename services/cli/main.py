"""The `edgesplit` command: a thin dispatcher over per-topic command modules.

Each module in ``_COMMAND_MODULES`` defines ``register(subparsers)``, which adds its
sub-commands with ``set_defaults(handler=...)``. A handler takes the parsed arguments
and returns an exit status. User errors are raised as ``EdgesplitError`` and printed as
one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from shared.errors import EdgesplitError

_COMMAND_MODULES = (
    "services.cli.models",
    "services.cli.infer",
    "services.cli.plan",
    "services.cli.system",
    "services.cli.emulate",
    "services.cli.scenario",
    "services.cli.creds",
    "services.cli.serve_shards",
    "services.cli.health",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"edgesplit: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgesplit",
        description="Run transformer models split across edge nodes over MQTT.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:
                continue  # that part of the command is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except EdgesplitError as error:
        print(f"edgesplit: {error}", file=sys.stderr)
        return 1
    except ValidationError as error:  # a value no check caught earlier: still one line
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or error.title
        print(f"edgesplit: invalid {where}: {first['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgesplit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


