"""`python -m services.split_reviser --shards DIR [--broker URL] [--cluster ID] ...`"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from services.split_reviser.service import ReviserSettings, SplitReviserService
from shared.config import load_settings
from shared.errors import EdgesplitError
from shared.process import OneLineParser, add_bus_arguments, configure_logging, run_service


def parse_args(argv: list[str] | None = None) -> Any:
    parser = OneLineParser(
        prog="python -m services.split_reviser",
        description="The edgesplit split reviser: answers plan requests (a live capacity "
        "profile, privacy policy and objective) with the best split and its alternatives.",
    )
    parser.add_argument("--shards", dest="shards_dir", type=Path,
                        help="shard store of the served model (written by `edgesplit shard`; "
                             "env EDGESPLIT_SHARDS_DIR)")  # fmt: skip
    parser.add_argument("--solve-timeout-s", type=float,
                        help="deadline for one plan request, seconds (default 10)")  # fmt: skip
    parser.add_argument("--max-parallel-solves", type=int,
                        help="plan requests solved at once (default 1)")  # fmt: skip
    parser.add_argument("--client-id", help="MQTT client id (default split-reviser-<random>)")
    add_bus_arguments(parser)
    return parser.parse_args(argv)


def settings_from(args: Any) -> ReviserSettings:
    """CLI > EDGESPLIT_* environment > defaults. Raises ConfigError."""
    return load_settings(ReviserSettings, {
        "shards_dir": args.shards_dir,
        "broker_url": args.broker_url,
        "cluster": args.cluster,
        "client_id": args.client_id,
        "solve_timeout_s": args.solve_timeout_s,
        "max_parallel_solves": args.max_parallel_solves,
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, "split-reviser")
    try:
        settings = settings_from(args)
    except EdgesplitError as error:
        print(f"split-reviser: {error}", file=sys.stderr)
        return 2
    return run_service("split-reviser", SplitReviserService(settings).run)


if __name__ == "__main__":
    sys.exit(main())
