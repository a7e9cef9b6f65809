"""The gateway service: the OpenAI-compatible API (services/gateway/app.py) served by
uvicorn, on one client-library connection to the broker.

It is a client of the request topics like `edgesplit generate --broker`: it reads the
retained plan (the served model's name), sends requests to the plan's entry node and
streams the replies. It sees prompts, so it runs on a trusted node. It computes
nothing: no model, no tokenizer; the chat template is string work.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import Field

from services.cli.client import Client, ClientOptions
from services.gateway.app import GATEWAY_SERIES, Backend, build_app
from services.gateway.chat import ChatTemplate
from services.gateway.dashboard import DashboardState
from shared.config import BusSettings
from shared.errors import ConfigError
from shared.metrics import ServiceMetrics, message_readings

log = logging.getLogger(__name__)


class GatewaySettings(BusSettings):
    """The gateway process (env EDGESPLIT_GATEWAY_*). Units in field names."""

    gateway_host: str = Field(default="127.0.0.1", description="address the HTTP API listens on")
    gateway_port: int = Field(default=8000, ge=0, le=65535, description="its port (0: any free one)")
    gateway_api_key: str | None = Field(default=None, min_length=1,
                                        description="when set, requests need Authorization: Bearer KEY")  # fmt: skip
    gateway_model_dir: Path | None = Field(default=None,
                                           description="checkpoint folder whose tokenizer_config.json "
                                                       "has the chat template (none: ChatML)")  # fmt: skip
    gateway_request_timeout_s: float = Field(default=120.0, gt=0, description="deadline of one request")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the process's `run_service` owns them."""

    def capture_signals(self) -> Any:  # type: ignore[override]
        return nullcontext()


class GatewayService:
    """Constructor does no I/O; ``run()`` serves until cancelled.

    ``ready`` is set once the HTTP socket listens and the broker connection is up;
    ``address`` is then ``(host, port)``.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.ready = asyncio.Event()
        self.address: tuple[str, int] | None = None
        self.metrics = ServiceMetrics("gateway", GATEWAY_SERIES)
        self.dashboard = DashboardState()

    async def run(self) -> None:
        settings = self.settings
        chat_template = await asyncio.to_thread(ChatTemplate.for_model, settings.gateway_model_dir)
        listener = _listen(settings.gateway_host, settings.gateway_port)
        self.address = listener.getsockname()[:2]
        options = ClientOptions(settings, timeout_s=settings.gateway_request_timeout_s)
        try:
            async with (Client(options=options) as client, self.metrics.served(settings),
                        asyncio.TaskGroup() as group):  # fmt: skip
                backend = Backend(client, client.current_plan, chat_template, settings.gateway_api_key,
                                  settings.gateway_request_timeout_s, self.metrics, self.dashboard)  # fmt: skip
                self.metrics.add_reader(lambda: message_readings(client.bus.counters))
                group.create_task(self.dashboard.follow(client.bus), name="dashboard")
                config = uvicorn.Config(build_app(backend), log_level="warning", lifespan="off",
                                        timeout_graceful_shutdown=2)  # fmt: skip
                server = _Server(config)
                group.create_task(self._serve(server, listener), name="gateway-http")
                log.info("gateway at http://%s:%d/v1 (chat template: %s)", *self.address, chat_template.origin)
                self.ready.set()
        finally:
            listener.close()

    async def _serve(self, server: uvicorn.Server, listener: socket.socket) -> None:
        """uvicorn until cancelled; then its graceful stop (open streams end, sockets close)."""
        serving = asyncio.get_running_loop().create_task(server.serve(sockets=[listener]))
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            server.should_exit = True
            await asyncio.shield(serving)
            raise


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ConfigError when the address cannot be bound."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        listener.setblocking(False)
    except OSError as error:
        raise ConfigError(f"gateway cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener
