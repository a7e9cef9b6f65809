"""`python -m services.worker --node-id ID --shards DIR [--topology FILE] ...`"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from services.worker.service import WorkerService
from services.worker.settings import WorkerSettings
from shared.config import load_settings
from shared.errors import ConfigError, EdgesplitError
from shared.process import (
    OneLineParser,
    add_bus_arguments,
    configure_logging,
    fix_mmap_threshold,
    run_service,
)
from shared.security.signing import require_control_key
from shared.topology import load_topology


def parse_args(argv: list[str] | None = None) -> Any:
    parser = OneLineParser(prog="python -m services.worker",
                           description="An edgesplit worker: one edge node hosting a model segment.")  # fmt: skip
    # Not required here: EDGESPLIT_NODE_ID and EDGESPLIT_SHARDS_DIR may give them (containers);
    # missing from both, the settings refuse to load (ConfigError, exit 2).
    parser.add_argument("--node-id", help="this node's id ([A-Za-z0-9_-], 1-64; env EDGESPLIT_NODE_ID)")
    parser.add_argument("--shards", dest="shards_dir", type=Path,
                        help="folder written by `edgesplit shard` (env EDGESPLIT_SHARDS_DIR)")  # fmt: skip
    parser.add_argument("--shards-url", help="or: http(s) URL serving such a folder (fetched, verified, cached)")
    parser.add_argument("--topology", type=Path,
                        help="topology file: takes this node's trust, memory, speed, threads and links")  # fmt: skip
    parser.add_argument("--trust", type=int)
    parser.add_argument("--memory-bytes", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-batch-frames", dest="batch_frames", action="store_const", const=False,
                        help="send each decode step in a frame of its own (no batch frames)")
    parser.add_argument("--slowdown", type=float, help="emulated compute slowdown factor (>= 1)")
    parser.add_argument("--activation-precision", choices=("fp32", "fp16", "int8"),
                        help="how this node's activation frames travel (default fp32, exact)")  # fmt: skip
    parser.add_argument("--links", help='emulated egress as JSON: {"node": [bytes_per_s, latency_s]}')
    parser.add_argument("--private-blocks", type=int,
                        help="privacy policy: blocks [0, k) need --trusted-level (refuse plans otherwise)")  # fmt: skip
    parser.add_argument("--trusted-level", type=int, help="trust the entry and private blocks need")
    parser.add_argument("--max-in-flight", type=int,
                        help="entry: requests run at once (default: from the measured speed, 8 until measured)")  # fmt: skip
    parser.add_argument("--max-queued-requests", type=int,
                        help="entry: requests that may wait for a slot; more are refused busy "
                        "(default: sized from the KV budgets, 64-1024)")  # fmt: skip
    parser.add_argument("--device", help="torch device (cpu, cuda)")
    parser.add_argument("--kv-budget-bytes", type=int,
                        help="KV caches this node may hold (default: its memory after its weights, >= 64 MiB)")  # fmt: skip
    add_bus_arguments(parser)
    return parser.parse_args(argv)


def settings_from(args: Any) -> WorkerSettings:
    """CLI > topology file > EDGESPLIT_* environment > defaults."""
    from_topology: dict[str, Any] = {}
    if args.topology is not None:
        if args.node_id is None:
            raise ConfigError("--topology needs --node-id (the node to take from it)")
        topology = load_topology(args.topology)
        node = topology.node(args.node_id)
        from_topology = {
            "trust": node.trust,
            "memory_bytes": int(node.memory_bytes),
            "threads": node.threads,
            "slowdown": node.slowdown,
            "private_blocks": topology.private_blocks,
            "trusted_level": topology.trusted_level,
            "link_shapes": {
                dst: (link.bandwidth_bytes_per_s, link.latency_s)
                for (src, dst), link in topology.directed_links().items()
                if src == args.node_id
            },
            # the node pairs that may exchange activations: the ones to probe
            "probe_peers": tuple(
                sorted({dst for src, dst in topology.directed_links() if src == args.node_id})
            ) if topology.links else None,
        }
    links = None
    if args.links is not None:
        try:
            links = {dst: (shape[0], shape[1]) for dst, shape in json.loads(args.links).items()}
        except (ValueError, TypeError, IndexError, AttributeError):
            raise ConfigError('--links must be JSON like {"rsu": [1250000, 0.005]}') from None
    cli = {
        "node_id": args.node_id,
        "shards_dir": args.shards_dir,
        "shards_url": args.shards_url,
        "broker_url": args.broker_url,
        "cluster": args.cluster,
        "client_id": args.node_id,
        "trust": args.trust,
        "memory_bytes": args.memory_bytes,
        "threads": args.threads,
        "slowdown": args.slowdown,
        "link_shapes": links,
        "max_in_flight": args.max_in_flight,
        "max_queued_requests": args.max_queued_requests,
        "private_blocks": args.private_blocks,
        "trusted_level": args.trusted_level,
        "device": args.device,
        "kv_budget_bytes": args.kv_budget_bytes,
        "activation_precision": args.activation_precision,
        "batch_frames": args.batch_frames,
    }
    merged = {**from_topology, **{k: v for k, v in cli.items() if v is not None}}
    return load_settings(WorkerSettings, merged)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The compute thread gets the GIL back within 0.5 ms after an emulated sleep (the 5 ms
    # default made a 4x slowdown of sub-ms forwards measure as 9x; docs/MONITOR.md).
    sys.setswitchinterval(0.0005)
    fix_mmap_threshold()  # int8 blocks: load buffers go back to the OS (shared/process.py)
    configure_logging(args.log_level, f"worker[{args.node_id}]")
    try:
        settings = settings_from(args)
        require_control_key(settings, "worker")
    except EdgesplitError as error:
        print(f"worker: {error}", file=sys.stderr)
        return 2
    return run_service(f"worker[{settings.node_id}]", WorkerService(settings).run)


if __name__ == "__main__":
    sys.exit(main())
