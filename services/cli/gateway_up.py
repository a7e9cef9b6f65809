"""`edgesplit up --http HOST:PORT|off`: the gateway (services/gateway) as one of the
processes `up` starts, after the first plan is served."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shared.config import BusSettings
from shared.errors import ConfigError

if TYPE_CHECKING:
    from services.cli.launcher import Stack

DEFAULT_HTTP = "127.0.0.1:8000"


def parse_http_option(text: str) -> tuple[str, int] | None:
    """``--http``: ``HOST:PORT`` -> (host, port); ``off`` -> None. Raises ConfigError."""
    if text.strip().lower() == "off":
        return None
    from services.gateway.service import parse_http

    return parse_http(text)


def start_gateway(stack: Stack, settings: BusSettings, http: tuple[str, int], model_dir: Path,
                  run_dir: Path) -> str:  # fmt: skip
    """Start the gateway on ``http`` with ``model_dir``'s chat template; its API's URL."""
    from services.cli.launcher import start_service

    host, port = http
    shown = f"[{host}]" if ":" in host else host
    stack.logs["gateway"] = run_dir / "gateway.log"
    stack.services["gateway"] = start_service(
        "gateway", ["--http", f"{shown}:{port}", "--model", str(model_dir)], settings, stack.logs["gateway"])
    return f"http://{shown}:{port}/v1"


def check_http(text: str | None) -> tuple[str, int] | None:
    """The ``--http`` option of `up` (default 127.0.0.1:8000)."""
    try:
        return parse_http_option(text or DEFAULT_HTTP)
    except ConfigError as error:
        raise ConfigError(str(error).replace("HOST:PORT", "HOST:PORT or off", 1)) from None
