"""`python -m services.gateway [--http HOST:PORT] [--api-key KEY] [--model DIR] [--broker URL] ...`"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from services.gateway.service import GatewayService, GatewaySettings
from shared.config import load_settings, parse_host_port
from shared.errors import EdgesplitError
from shared.process import OneLineParser, add_bus_arguments, configure_logging, run_service


def parse_args(argv: list[str] | None = None) -> Any:
    parser = OneLineParser(
        prog="python -m services.gateway",
        description="The edgesplit gateway: an OpenAI-compatible HTTP API (/v1/models, "
        "/v1/completions, /v1/chat/completions, /v1/embeddings) in front of the running system.",
    )
    parser.add_argument("--http", metavar="HOST:PORT",
                        help="where the API listens (default 127.0.0.1:8000; env "
                             "EDGESPLIT_GATEWAY_HOST, EDGESPLIT_GATEWAY_PORT)")  # fmt: skip
    parser.add_argument("--api-key", help="require Authorization: Bearer KEY (env EDGESPLIT_GATEWAY_API_KEY)")
    parser.add_argument("--model", dest="model_dir", type=Path,
                        help="checkpoint folder with the chat template (tokenizer_config.json); "
                             "without one, ChatML (env EDGESPLIT_GATEWAY_MODEL_DIR)")  # fmt: skip
    parser.add_argument("--request-timeout-s", type=float, help="deadline of one request (default 120)")
    add_bus_arguments(parser)
    return parser.parse_args(argv)


def settings_from(args: Any) -> GatewaySettings:
    """CLI > EDGESPLIT_* environment > defaults. Raises ConfigError."""
    host, port = parse_host_port(args.http) if args.http else (None, None)
    return load_settings(GatewaySettings, {
        "broker_url": args.broker_url,
        "cluster": args.cluster,
        "gateway_host": host,
        "gateway_port": port,
        "gateway_api_key": args.api_key,
        "gateway_model_dir": args.model_dir,
        "gateway_request_timeout_s": args.request_timeout_s,
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, "gateway")
    try:
        settings = settings_from(args)
    except EdgesplitError as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 2
    return run_service("gateway", GatewayService(settings).run)


if __name__ == "__main__":
    sys.exit(main())
