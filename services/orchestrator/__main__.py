"""`python -m services.orchestrator --shards DIR [--entry NODE] [--expect-nodes a,b] ...`"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from services.orchestrator.service import OrchestratorService
from services.orchestrator.settings import OrchestratorSettings, parse_layout
from shared.config import load_settings
from shared.errors import EdgesplitError
from shared.process import OneLineParser, add_bus_arguments, configure_logging, run_service
from shared.security.signing import require_signing_key

_FLOATS = ("period_s", "relative_threshold", "dwell_s", "horizon_s", "switch_overhead_s",
           "shard_load_bytes_per_s", "observe_s", "ready_timeout_s")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> Any:
    parser = OneLineParser(
        prog="python -m services.orchestrator",
        description="The edgesplit adaptive orchestrator: watches the capacity profile, asks "
        "the split reviser for candidates, and decides keep / migrate / re-split.",
    )
    parser.add_argument("--shards", dest="shards_dir", type=Path,
                        help="shard store of the served model (written by `edgesplit shard`; "
                             "env EDGESPLIT_SHARDS_DIR)")  # fmt: skip
    parser.add_argument("--entry", help="entry node (default: the retained plan's entry)")
    parser.add_argument("--expect-nodes", help="comma-separated nodes the first plan waits for")
    parser.add_argument("--policy", choices=("adaptive", "migrate", "static"),
                        help="what may change after the first plan (default adaptive)")
    parser.add_argument("--first-plan", metavar="NODE:START:END,...",
                        help="start from this plan when the measured profile admits it")
    parser.add_argument("--precision-policy", help="JSON: the activation precisions hops may use "
                        "and the quality budget (docs/PLANNER.md, 'Precision'; default exact, fp32)")
    parser.add_argument("--private-blocks", type=int, help="policy until a retained one arrives")
    parser.add_argument("--trusted-level", type=int, help="policy until a retained one arrives")
    for name in _FLOATS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, help=f"{name} (see docs/ORCHESTRATOR.md)")
    parser.add_argument("--client-id", help="MQTT client id (default orchestrator-<random>)")
    parser.add_argument("--identities", dest="identities_file", type=Path,
                        help="the operator's identity registry (STATE/identities.toml): "
                             "each node's trust comes from it, not from the node")  # fmt: skip
    add_bus_arguments(parser)
    return parser.parse_args(argv)


def settings_from(args: Any) -> OrchestratorSettings:
    """CLI > EDGESPLIT_* environment > defaults. Raises ConfigError."""
    expect = tuple(n for n in (args.expect_nodes or "").split(",") if n) or None
    values = {"shards_dir": args.shards_dir, "broker_url": args.broker_url, "cluster": args.cluster,
              "identities_file": args.identities_file,
              "client_id": args.client_id, "entry": args.entry, "expect_nodes": expect,
              "private_blocks": args.private_blocks, "trusted_level": args.trusted_level,
              "policy": args.policy, "precision_policy": args.precision_policy}  # fmt: skip
    values |= {name: getattr(args, name) for name in _FLOATS}
    if args.first_plan is not None:
        values["first_plan"] = parse_layout(args.first_plan)
    return load_settings(OrchestratorSettings, values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, "orchestrator")
    try:
        settings = settings_from(args)
        require_signing_key(settings, "orchestrator")
    except EdgesplitError as error:
        print(f"orchestrator: {error}", file=sys.stderr)
        return 2
    return run_service("orchestrator", OrchestratorService(settings).run)


if __name__ == "__main__":
    sys.exit(main())
