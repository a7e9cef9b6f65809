"""The seeded workload: when each request is sent and with which prompt, and what it got.

The arrival times and prompt choices depend only on the scenario's seed, so every policy
sees the same requests (poisson: the same send times; closed: the same prompt order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.cli.client import Client
from services.cli.scenarios.analysis import agreement, mismatched
from services.cli.scenarios.records import RequestRecord
from services.cli.scenarios.spec import Workload
from shared.errors import EdgesplitError, NoAnswer

log = logging.getLogger(__name__)


def arrival_times(workload: Workload, duration_s: float, seed: int) -> list[float]:
    """Poisson send times in [0, duration_s), seconds from the start (empty when closed)."""
    if workload.arrival != "poisson" or not workload.rate_per_s:
        return []
    rng = random.Random(seed)
    times: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(workload.rate_per_s)
        if t >= duration_s:
            return times
        times.append(t)


def prompt_order(count: int, prompts: int, seed: int) -> list[int]:
    """Which prompt the n-th request uses: a seeded choice, the same for every policy."""
    rng = random.Random(seed + 1)
    return [rng.randrange(prompts) for _ in range(count)]


def error_code(error: BaseException) -> str:
    """The typed failure's code: the RequestFailed error ("busy: ..."), else the type."""
    text = str(error)
    head = text.split(":", 1)[0]
    if head and head.replace("_", "").isalnum() and head.islower():
        return head
    return type(error).__name__


@dataclass
class _Open:
    """A request in flight: what has been seen so far."""

    prompt_index: int
    sent_at_s: float
    token_times_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


class WorkloadDriver:
    """Sends the workload through one client connection and records every request."""

    def __init__(self, client: Client, workload: Workload, duration_s: float, seed: int,
                 clock: Callable[[], float], request_timeout_s: float,
                 references: dict[int, tuple[Any, ...]]) -> None:  # fmt: skip
        self.client = client
        self.workload = workload
        self.duration_s = duration_s
        self.seed = seed
        self.clock = clock
        """Seconds since the start of the measured run."""
        self.request_timeout_s = request_timeout_s
        self.references = references
        """The unsplit model's answer per prompt index (tokens, or the embedding)."""
        self.records: list[RequestRecord] = []
        self.open: dict[int, _Open] = {}
        self._sent = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._order = prompt_order(100_000, self._prompt_count(), seed)

    def _prompt_count(self) -> int:
        return len(self.workload.prompts) or len(self.workload.prompt_ids)

    @property
    def sent(self) -> int:
        return self._sent

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``duration_s`` passed or ``stop`` is set; then return (requests still
        in flight keep running in their own tasks until `drain`)."""
        if self.workload.arrival == "poisson":
            for at_s in arrival_times(self.workload, self.duration_s, self.seed):
                delay = at_s - self.clock()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
                if stop.is_set():
                    return
                self._start()
            return
        concurrency = self.workload.concurrency or 1
        loops = [asyncio.create_task(self._closed_loop(stop)) for _ in range(concurrency)]
        try:
            await asyncio.gather(*loops)
        finally:
            for task in loops:
                task.cancel()

    async def _closed_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and self.clock() < self.duration_s:
            await self._start()

    def _start(self) -> asyncio.Task[None]:
        number = self._sent
        self._sent += 1
        task = asyncio.create_task(self._one(number, self._order[number % len(self._order)]),
                                   name=f"request-{number}")  # fmt: skip
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for requests in flight; the rest are recorded as lost."""
        tasks = set(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for number, state in sorted(self.open.items()):
            self._record(number, state, "lost", error="no terminal answer before the run ended")
        self.open.clear()

    async def _one(self, number: int, prompt_index: int) -> None:
        state = _Open(prompt_index, self.clock())
        self.open[number] = state
        try:
            if self.workload.kind == "embed":
                vector = await self.client.embed(self.workload.prompts[prompt_index],
                                                 timeout_s=self.request_timeout_s)  # fmt: skip
                state.token_times_s.append(self.clock())
                want = self.references.get(prompt_index)
                self._record(number, state, "completed", differs=mismatched("embed", vector, want),
                             agreed=agreement("embed", vector, want))  # fmt: skip
                return
            prompt = (self.workload.prompts[prompt_index] if self.workload.prompts
                      else list(self.workload.prompt_ids[prompt_index]))  # fmt: skip
            stream = self.client.generate(prompt, max_new_tokens=self.workload.max_new_tokens,
                                          timeout_s=self.request_timeout_s)  # fmt: skip
            async for token in stream:
                state.token_times_s.append(self.clock())
                state.tokens.append(token.token_id)
            want = self.references.get(prompt_index)
            self._record(number, state, "completed", differs=mismatched("generate", state.tokens, want),
                         agreed=agreement("generate", state.tokens, want))  # fmt: skip
        except NoAnswer as error:
            self._record(number, state, "lost", error=str(error)[:200])
        except EdgesplitError as error:
            self._record(number, state, "failed", error=error_code(error))

    def _record(self, number: int, state: _Open, outcome: str, error: str | None = None,
                differs: bool = False, agreed: float | None = None) -> None:  # fmt: skip
        if self.open.pop(number, None) is None and outcome != "lost":
            return
        self.records.append(RequestRecord(
            request_id=f"r{number}", prompt_index=state.prompt_index, sent_at_s=state.sent_at_s,
            outcome=outcome,  # type: ignore[arg-type]
            first_token_at_s=state.token_times_s[0] if state.token_times_s else None,
            finished_at_s=self.clock() if outcome != "lost" else None,
            token_times_s=tuple(state.token_times_s), tokens=tuple(state.tokens), error=error,
            mismatched=differs, agreement=agreed,
        ))  # fmt: skip

    def done(self) -> int:
        return len(self.records)

    def failed(self) -> int:
        return sum(1 for r in self.records if r.outcome != "completed")
