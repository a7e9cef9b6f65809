"""`python -m services.monitor [--topology FILE] [--shards DIR] ...`"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from services.monitor.service import MonitorService, MonitorSettings, load_layer_costs
from shared.config import load_settings
from shared.errors import EdgesplitError
from shared.process import OneLineParser, add_bus_arguments, configure_logging, run_service
from shared.security.signing import require_signing_key
from shared.topology import load_topology


def parse_args(argv: list[str] | None = None) -> Any:
    parser = OneLineParser(prog="python -m services.monitor",
                           description="The edgesplit monitor: profiles nodes and links, "
                                       "publishes the capacity profile and change events.")  # fmt: skip
    parser.add_argument("--topology", type=Path,
                        help="topology file: its links are the node pairs to profile (default: all pairs)")  # fmt: skip
    parser.add_argument("--shards", dest="shards_dir", type=Path,
                        help="shard store whose manifest gives the layer costs")  # fmt: skip
    parser.add_argument("--heartbeat-timeout-s", type=float, help="a silent node is down after (default 3)")
    parser.add_argument("--profile-period-s", type=float, help="profile publishing period (default 1)")
    parser.add_argument("--persist-s", type=float, help="a change must hold this long (default 3)")
    parser.add_argument("--identities", dest="identities_file", type=Path,
                        help="the operator's identity registry (STATE/identities.toml): "
                             "each node's trust comes from it, not from the node")  # fmt: skip
    add_bus_arguments(parser)
    return parser.parse_args(argv)


def settings_from(args: Any) -> MonitorSettings:
    """CLI > topology file > EDGESPLIT_* environment > defaults."""
    links: tuple[tuple[str, str], ...] | None = None
    symmetric: tuple[tuple[str, str], ...] = ()
    if args.topology is not None:
        topology = load_topology(args.topology)
        links = tuple(sorted(topology.directed_links())) if topology.links else None
        symmetric = tuple(sorted((link.src, link.dst) for link in topology.links if link.symmetric))
    return load_settings(MonitorSettings, {
        "broker_url": args.broker_url, "cluster": args.cluster, "links": links, "symmetric_links": symmetric,
        "identities_file": args.identities_file,
        "shards_dir": args.shards_dir, "heartbeat_timeout_s": args.heartbeat_timeout_s,
        "profile_period_s": args.profile_period_s, "persist_s": args.persist_s,
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, "monitor")
    try:
        settings = settings_from(args)
        model_id, layers = load_layer_costs(settings.shards_dir) if settings.shards_dir else ("", ())
        require_signing_key(settings, "monitor")
    except EdgesplitError as error:
        print(f"monitor: {error}", file=sys.stderr)
        return 2
    return run_service("monitor", MonitorService(settings, layers=layers, model_id=model_id).run)


if __name__ == "__main__":
    sys.exit(main())
