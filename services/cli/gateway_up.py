"""`edgesplit up --http HOST:PORT|off`: the gateway (services/gateway) as one of the
processes `up` starts, after the first plan is served."""

from __future__ import annotations

from pathlib import Path

from shared.config import parse_host_port
from shared.errors import ConfigError

DEFAULT_HTTP = "127.0.0.1:8000"


def parse_http_option(text: str) -> tuple[str, int] | None:
    """``--http``: ``HOST:PORT`` -> (host, port); ``off`` -> None. Raises ConfigError."""
    if text.strip().lower() == "off":
        return None
    return parse_host_port(text)


def gateway_arguments(http: tuple[str, int], model_dir: Path) -> tuple[list[str], str]:
    """The gateway's arguments for listening on ``http`` with ``model_dir``'s chat
    template, and its API's URL."""
    host, port = http
    shown = f"[{host}]" if ":" in host else host
    return ["--http", f"{shown}:{port}", "--model", str(model_dir)], f"http://{shown}:{port}/v1"


def check_http(text: str | None) -> tuple[str, int] | None:
    """The ``--http`` option of `up` (default 127.0.0.1:8000)."""
    try:
        return parse_http_option(text or DEFAULT_HTTP)
    except ConfigError as error:
        raise ConfigError(str(error).replace("HOST:PORT", "HOST:PORT or off", 1)) from None
