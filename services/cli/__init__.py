"""The command line, the Python client library and the launcher of `edgesplit up`.

``main`` is the `edgesplit` entry point (services/cli/main.py); the client library that
talks to a running system is ``services.cli.client`` (usable without argparse); the
launcher that starts a whole stack is ``services.cli.launcher``. This package is not a
service: it imports ``shared`` only, never a service package.
"""

from services.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
