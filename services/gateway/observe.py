"""What the gateway measures of each request it serves: time to first token, time per
output token, tokens and the outcome, into its Prometheus series (shared/metrics.py) and
the dashboard's time-per-token history (services/gateway/dashboard.py)."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.cli.streams import TokenStream
from services.gateway.openai_api import error_for
from shared.messages import RequestFinished, TokenGenerated
from shared.metrics import ServiceMetrics


def outcome_of(error: BaseException) -> str:
    """The ``outcome`` label of a failed request: OpenAI's error code, else its type."""
    api = error_for(error)
    return api.code or api.type


class TimedStream:
    """A `TokenStream` as the API reads it (``anext``, ``collect``, ``result``,
    ``aclose``), timing every token into ``metrics``; ``on_token_gap`` gets each gap
    between output tokens (seconds)."""

    def __init__(self, stream: TokenStream, metrics: ServiceMetrics,
                 on_token_gap: Callable[[float], None] | None = None) -> None:  # fmt: skip
        self._stream, self._metrics, self._on_gap = stream, metrics, on_token_gap
        self._started_s = time.monotonic()
        self._last_s: float | None = None
        self._done = False

    @property
    def result(self) -> RequestFinished | None:
        return self._stream.result

    def __aiter__(self) -> TimedStream:
        return self

    async def __anext__(self) -> TokenGenerated:
        try:
            token = await anext(self._stream)
        except StopAsyncIteration:
            self._finish("ok")
            raise
        except BaseException as error:
            self._finish("cancelled" if not isinstance(error, Exception) else outcome_of(error))
            raise
        now_s = time.monotonic()
        if self._last_s is None:
            self._metrics.time_to_first_token_s.observe(now_s - self._started_s)
        else:
            gap_s = now_s - self._last_s
            self._metrics.time_per_output_token_s.observe(gap_s)
            if self._on_gap is not None:
                self._on_gap(gap_s)
        self._last_s = now_s
        self._metrics.tokens.inc()
        return token

    async def collect(self) -> RequestFinished:
        async for _token in self:
            pass
        assert self._stream.result is not None  # set when the iteration ends
        return self._stream.result

    async def aclose(self) -> None:
        self._finish("cancelled")
        await self._stream.aclose()

    def _finish(self, outcome: str) -> None:
        if not self._done:
            self._done = True
            self._metrics.requests.labels("generate", outcome).inc()
