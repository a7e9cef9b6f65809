"""`python -m services.broadcaster [--broker URL] [--cluster C] [--shards DIR]`"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from services.broadcaster.service import (
    BroadcasterService,
    BroadcasterSettings,
    load_manifest_sha256,
    load_num_layers,
)
from shared.config import load_settings
from shared.errors import EdgesplitError
from shared.process import OneLineParser, add_bus_arguments, configure_logging, run_service
from shared.security.signing import require_control_key


def parse_args(argv: list[str] | None = None) -> Any:
    parser = OneLineParser(prog="python -m services.broadcaster",
                           description="The edgesplit broadcaster: rolls plans out as new epochs "
                                       "in two phases (PREPARE / READY / COMMIT / ABORT).")  # fmt: skip
    parser.add_argument("--shards", dest="shards_dir", type=Path,
                        help="shard store whose manifest gives the block count plans must cover "
                             "(default: each plan's own last block)")  # fmt: skip
    parser.add_argument(
        "--max-queued", type=int, help="rollouts waiting behind the active one (default 16)"
    )
    parser.add_argument("--identities", dest="identities_file", type=Path,
                        help="the operator's identity registry (STATE/identities.toml): "
                             "each node's trust comes from it, not from the node")  # fmt: skip
    add_bus_arguments(parser)
    return parser.parse_args(argv)


def settings_from(args: Any) -> BroadcasterSettings:
    """CLI > EDGESPLIT_* environment > defaults."""
    return load_settings(BroadcasterSettings, {
        "broker_url": args.broker_url, "cluster": args.cluster, "shards_dir": args.shards_dir,
        "identities_file": args.identities_file,
        "max_queued_rollouts": args.max_queued,
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, "broadcaster")
    try:
        settings = settings_from(args)
        num_layers = load_num_layers(settings.shards_dir) if settings.shards_dir else None
        digest = load_manifest_sha256(settings.shards_dir) if settings.shards_dir else ""
        require_control_key(settings, "broadcaster")
    except EdgesplitError as error:
        print(f"broadcaster: {error}", file=sys.stderr)
        return 2
    return run_service("broadcaster", BroadcasterService(settings, num_layers, manifest_sha256=digest).run)


if __name__ == "__main__":
    sys.exit(main())
