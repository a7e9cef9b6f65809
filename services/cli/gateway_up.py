"""`edgesplit up --http HOST:PORT|off`: the gateway (services/gateway) as one of the
processes `up` starts, after the first plan is served."""

from __future__ import annotations

import socket
import sys
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
    """The ``--http`` option of `up` (default 127.0.0.1:8000). Left out and the default
    port taken (another server, another `up`), a free port on the same host is used and
    said on stderr, so `up` still runs; a port given explicitly is used as given."""
    try:
        http = parse_http_option(text or DEFAULT_HTTP)
    except ConfigError as error:
        raise ConfigError(str(error).replace("HOST:PORT", "HOST:PORT or off", 1)) from None
    if text is None and http is not None and not port_free(*http):
        host, taken = http
        http = (host, free_port_on(host))
        print(f"edgesplit: port {taken} is taken; the gateway listens on {http[1]} instead "
              f"(--http HOST:PORT chooses, --http off leaves it out)", file=sys.stderr)  # fmt: skip
    return http


def port_free(host: str, port: int) -> bool:
    """Whether a TCP server could listen on ``host:port`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port_on(host: str) -> int:
    """A port the system has free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
