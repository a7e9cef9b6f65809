"""The entry role: the trusted node that owns requests end to end.

It tokenizes, embeds, runs its own segment, sends the activation down the pipeline,
receives the final hidden state, runs the head, samples and streams each token to the
client, and loops. It runs at most ``max_in_flight`` requests at once; the rest wait in
a bounded FIFO queue (services/worker/admission.py) and start as slots free. It journals
each running request (prompt, tokens so far) so a later replay can rebuild the
pipeline's KV caches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np
import torch

from services.worker.admission import (
    QUEUE_FLOOR,
    EntryDesk,
    JournalEntry,
    Reply,
    ReplyMessage,
    WaitingQueue,
    asked_of,
)
from services.worker.compute import KvMissing
from services.worker.errors import NodeLost, NoPlan
from services.worker.kv_budget import KvLedger
from services.worker.prompt import PromptLimits, prompt_ids
from shared.errors import BusError, ConfigError, ContextTooLong, Overloaded, StageTimedOut
from shared.messages import (
    EmbeddingReady,
    EmbedRequest,
    GenerateRequest,
    RequestFailed,
    RequestFinished,
    TokenGenerated,
)
from shared.metrics import ServiceMetrics
from shared.model.runtime import EntryRuntime
from shared.model.sampling import Sampler, SamplingParams, check_context, should_stop
from shared.model.tokenizer import StreamDecoder, TextTokenizer
from shared.tensor_frame import to_torch

log = logging.getLogger(__name__)

# pipeline_pass(request_id, step, token_ids, position, last_only, head) -> (final hidden, epoch used)
PipelinePass = Callable[[str, int, np.ndarray, int, bool, "NextToken | None"],
                        Awaitable[tuple[np.ndarray, int]]]  # fmt: skip
Compute = Callable[..., Awaitable[object]]


class _Finished(Exception):
    """Raised by `NextToken` when its token ends the request (EOS, max_new_tokens)."""


class NextToken:
    """The compute job at the start of a decode step: head and sampling on the previous
    pass's final hidden state; returns the token to embed next, or raises _Finished.

    The token goes to the client as soon as it is sampled (``call_soon_threadsafe``),
    while the same job goes on to embed it and run the entry's blocks. Idempotent: a
    retried pass samples once and streams the token once.
    """

    def __init__(self, role: EntryRole, entry: JournalEntry, hidden: np.ndarray, sampler: Sampler,
                 stream: StreamDecoder, index: int, loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        self._role, self._entry, self._hidden, self._sampler = role, entry, hidden, sampler
        self._stream, self._index, self._loop = stream, index, loop
        self.token: int | None = None
        self._last = False

    def head_input(self) -> np.ndarray | None:
        """The final hidden state whose logits this step samples; None once sampled (a
        retried pass). A batched decode step stacks these for one head call."""
        return None if self.token is not None else self._hidden

    def __call__(self, logits: torch.Tensor | None = None) -> np.ndarray:
        """Compute thread. ``logits``: the head's output for `head_input`, when a batched
        step computed it already (else the head runs here)."""
        if self.token is None:
            token = self._role.sample_token(self._hidden, self._sampler, logits)
            text = self._stream.push(token)[:1024]
            request = self._entry.request
            assert isinstance(request, GenerateRequest)
            self._last = should_stop(token, self._index + 1, request.max_new_tokens,
                                     self._role.config.eos_token_ids)  # fmt: skip
            self.token = token
            self._loop.call_soon_threadsafe(self._role.emit_token, self._entry, self._index, token, text)
        if self._last:
            raise _Finished
        return np.asarray([self.token], dtype=np.int64)


FINISHED_KEPT = 512
"""Final replies the entry keeps, to answer a resubmission whose final reply was lost."""
BUS_RETRY_S = 0.5
"""Pause before retrying a pass whose frame could not be published (broker away)."""


class EntryRole(EntryDesk):
    """Serves requests for one plan epoch's entry node."""

    def __init__(
        self,
        runtime: EntryRuntime,
        tokenizer: TextTokenizer,
        compute: Compute,
        pipeline_pass: PipelinePass,
        reply: Reply,
        max_in_flight: int,
        max_prompt_tokens: int,
        current_epoch: Callable[[], int | None] = lambda: None,
        handoff: Callable[[str, int, int], Awaitable[bool]] | None = None,
        wait_for_epoch: Callable[[int | None, float], Awaitable[bool]] | None = None,
        failover_wait_s: float = 10.0,
        max_replays: int = 4,
        max_prompt_chars: int | None = None,
        kv_ledger: KvLedger | None = None,
        max_queued: int = QUEUE_FLOOR,
        latency: ServiceMetrics | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.tokenizer = tokenizer
        self._compute = compute
        self._pass = pipeline_pass
        self._reply = reply
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        """Requests that may wait for a slot (the worker refreshes both bounds)."""
        self.waiting = WaitingQueue()
        self.prompt_limits = PromptLimits.of(self.config, max_prompt_tokens, max_prompt_chars)
        self.journal: dict[str, JournalEntry] = {}
        self._current_epoch = current_epoch
        self._handoff = handoff
        self._wait_for_epoch = wait_for_epoch
        self.failover_wait_s = failover_wait_s
        self.max_replays = max_replays
        self.finished: OrderedDict[str, tuple[tuple[object, ...], ReplyMessage]] = OrderedDict()
        """(what was asked, final reply) of recent requests, by request id."""
        self.counters: Counter[str] = Counter()
        self.kv_ledger = kv_ledger
        """KV reservations against the pipeline's budgets (None: not limited at admission)."""
        self.latency = latency
        """Where each streamed token's timing goes: time to first token from the request's
        arrival here, then the gap since the previous token (None: not measured)."""

    async def serve(self, request: GenerateRequest | EmbedRequest) -> None:
        """Run one request to completion; every failure becomes RequestFailed.

        Started by `admit` or `take_waiting` (its journal entry, made then, is the
        request's slot; the time it waited counts against ``timeout_s``); a request served
        without them is journalled here."""
        rid = request.request_id
        if rid not in self.journal:
            self.journal[rid] = JournalEntry(request, [])
        waited_s = time.perf_counter() - self.journal[rid].arrived_s  # in the queue: it counts
        try:
            async with asyncio.timeout(max(0.0, request.timeout_s - waited_s)):
                if isinstance(request, GenerateRequest):
                    await self._generate(request)
                else:
                    await self._embed(request)
        except TimeoutError:
            self._fail(rid, "timeout", f"request did not finish within {request.timeout_s} s")
        except NoPlan as error:
            self._fail(rid, "no_plan", str(error))
        except StageTimedOut as error:
            self._fail(rid, "timeout", str(error))
        except ContextTooLong as error:
            self._fail(rid, "context_too_long", str(error))
        except Overloaded as error:  # the KV budget: refused at admission, or by a node
            self.counters["refused_overloaded"] += 1
            self._fail(rid, "overloaded", str(error))
        except ConfigError as error:
            self._fail(rid, "invalid_request", str(error))
        except Exception as error:  # one request's failure must not stop the node
            log.exception("request %s failed", rid)
            self._fail(rid, "internal", f"{type(error).__name__}: {error}")
        finally:
            self.journal.pop(rid, None)
            if self.kv_ledger is not None:
                self.kv_ledger.release(rid)

    def _fail(self, rid: str, error: str, message: str) -> None:
        entry = self.journal.get(rid)
        if entry is None:
            return
        self._final(entry, RequestFailed(request_id=rid, error=error, message=message[:1024]))  # type: ignore[arg-type]

    def _final(self, entry: JournalEntry, reply: ReplyMessage) -> None:
        """Send a request's final reply and keep it for a resubmission that lost it."""
        self.finished[entry.request.request_id] = (asked_of(entry.request), reply)
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)
        self._reply(entry.request.reply_to, reply)

    async def _prompt_ids(self, prompt: str | None, token_ids: tuple[int, ...] | None) -> list[int]:
        """Raises what `prompt_ids` raises; text is tokenized off the event loop."""
        return await prompt_ids(self.tokenizer, self.prompt_limits, prompt, token_ids)

    async def _generate(self, request: GenerateRequest) -> None:
        """Decode until EOS or ``max_new_tokens``. A resubmission (``resume_token_ids``)
        continues after the tokens the client holds: one prefill of prompt + those tokens
        (a seeded sampler is advanced over them), then indices go on from there.

        Each decode step is one compute job on the entry: the head samples the previous
        pass's token (streamed to the client at once), then the embedding and the entry's
        own blocks run on it (`NextToken`)."""
        if not self.config.is_decoder:
            raise ConfigError(f"the model ({self.config.architecture}) is an encoder; use embed")
        rid, entry = request.request_id, self.journal[request.request_id]
        entry.prompt_ids = await self._prompt_ids(request.prompt, request.token_ids)
        check_context(len(entry.prompt_ids), request.max_new_tokens, self.config.max_positions)
        sampler = Sampler(SamplingParams(request.temperature, request.top_p, request.seed))
        stream = self.tokenizer.stream()
        resume = list(request.resume_token_ids or ())[: request.max_new_tokens]
        if self.kv_ledger is not None:  # before any pass: past the budget it is `overloaded`
            self.kv_ledger.reserve(rid, len(entry.prompt_ids) + len(resume), request.max_new_tokens - len(resume))
        entry.generated = list(resume)
        if resume:  # detokenizing is tokenizer work too: off the loop
            entry.texts = await asyncio.to_thread(lambda: [stream.push(token)[:1024] for token in resume])
        entry.first_at = time.perf_counter()
        if not (
            resume
            and should_stop(
                resume[-1], len(resume), request.max_new_tokens, self.config.eos_token_ids
            )
        ):
            step_input, position = entry.prompt_ids + resume, 0
            rows = 1 if sampler.params.greedy else len(resume) + 1
            hidden = await self._step(entry, len(resume), step_input, position, rows)
            position += len(step_input)
            loop = asyncio.get_running_loop()
            while True:
                index = len(entry.generated)
                head = NextToken(self, entry, hidden, sampler, stream, index, loop)
                try:
                    hidden = await self._step(entry, index + 1, [], position, 1, head)
                except _Finished:
                    break
                position += 1
        done_at, count = time.perf_counter(), len(entry.generated) - len(resume)
        eos = bool(entry.generated) and entry.generated[-1] in self.config.eos_token_ids
        text = await asyncio.to_thread(self.tokenizer.decode, list(entry.generated))
        self._final(entry, RequestFinished(
            request_id=rid,
            token_ids=tuple(entry.generated),
            text=text[:65536],
            finish_reason="eos" if eos else "length",
            ttft_s=entry.first_at - entry.arrived_s,
            tpot_s=(done_at - entry.first_at) / (count - 1) if count > 1 else 0.0,
        ))  # fmt: skip

    def emit_token(self, entry: JournalEntry, index: int, token: int, text: str) -> None:
        """Event loop: record generated token ``index`` and stream it to the client."""
        if len(entry.generated) != index or entry.request.request_id not in self.journal:
            return  # the request ended meanwhile (timeout): nothing more is sent
        entry.generated.append(token)
        entry.texts.append(text)
        now_s = time.perf_counter()
        first = index == len(getattr(entry.request, "resume_token_ids", None) or ())
        if first:
            entry.first_at = now_s
        if self.latency is not None:  # a histogram observation: cheap, fine on the loop
            if first:
                self.latency.time_to_first_token_s.observe(now_s - entry.arrived_s)
            elif entry.last_token_at is not None:
                self.latency.time_per_output_token_s.observe(now_s - entry.last_token_at)
        entry.last_token_at = now_s
        self._reply(entry.request.reply_to, TokenGenerated(
            request_id=entry.request.request_id, index=index, token_id=token, text=text))  # fmt: skip

    async def _step(self, entry: JournalEntry, step: int, step_input: list[int], position: int,
                    rows: int = 1, head: NextToken | None = None) -> np.ndarray:  # fmt: skip
        """One pass for decode step ``step``; the final hidden state's last ``rows`` rows.
        With ``head``, the pass's input is the token it samples (in the same compute job).

        When the request's KV caches are not (or no longer) in the committed epoch's
        pipeline (the plan changed, a node lost them, a frame was lost), the journal
        (prompt + tokens so far) is replayed from position 0 through the pipeline: the
        caches are rebuilt and the client sees identical tokens. A dead node makes it wait
        (``failover_wait_s``) for a new plan or the node's return first. Every retry
        spends the request's budget (``max_replays``); StageTimedOut when it is spent or
        no plan comes.
        """
        rid = entry.request.request_id
        while True:
            epoch = self._current_epoch()
            if position > 0 and entry.kv_epoch != epoch:
                if head is not None:  # the pending token first: a replay's input holds it
                    step_input, head = [int(token) for token in await self._compute(head)], None  # type: ignore[attr-defined]
                if await self._move_kv(entry, epoch, position):
                    entry.kv_epoch = epoch
                else:
                    step_input, position = entry.prompt_ids + entry.generated, 0
                    log.info(
                        "request %s: replaying %d tokens in epoch %s", rid, len(step_input), epoch
                    )
            try:
                hidden, entry.kv_epoch = await self._pass(
                    rid, step, np.asarray(step_input, dtype=np.int64), position, rows == 1, head
                )
                return hidden[-rows:]
            except KvMissing:
                why = "a node lacks the request's KV cache"
            except NodeLost as error:
                self._spend(entry, str(error))
                log.info("request %s: %s; waiting up to %.1f s for a new plan", rid, error,
                         self.failover_wait_s)  # fmt: skip
                if self._wait_for_epoch is None or not await self._wait_for_epoch(
                    epoch, self.failover_wait_s
                ):
                    raise StageTimedOut(
                        f"{error}; no new plan within {self.failover_wait_s} s"
                    ) from None
                entry.kv_epoch = None  # the new pipeline rebuilds the caches from the journal
                continue
            except StageTimedOut as error:  # a lost frame, or the plan moved under the pass
                why = str(error)
            except BusError as error:  # the broker is away: the bus reconnects meanwhile
                why = str(error)
                await asyncio.sleep(BUS_RETRY_S)
            self._spend(entry, why)
            entry.kv_epoch = None

    def _spend(self, entry: JournalEntry, why: str) -> None:
        """Count one retry of ``entry``; StageTimedOut once the budget is spent."""
        entry.replays += 1
        self.counters["retries"] += 1
        if entry.replays > self.max_replays:
            raise StageTimedOut(f"request {entry.request.request_id}: gave up after {self.max_replays} "
                                f"retries; last: {why}")  # fmt: skip
        log.info("request %s: retry %d of %d: %s", entry.request.request_id, entry.replays,
                 self.max_replays, why)  # fmt: skip

    async def _move_kv(self, entry: JournalEntry, epoch: int | None, length: int) -> bool:
        """Hand the request's KV caches over from its old epoch's nodes to the new ones."""
        if self._handoff is None or entry.kv_epoch is None or epoch is None:
            return False
        moved = await self._handoff(entry.request.request_id, entry.kv_epoch, length)
        if moved:
            log.info("request %s: KV handed over from epoch %d to %d", entry.request.request_id,
                     entry.kv_epoch, epoch)  # fmt: skip
        return moved

    def sample_token(self, hidden: np.ndarray, sampler: Sampler, logits: torch.Tensor | None = None) -> int:
        """Head + sampling on each row of the final hidden state, in order (rows before
        the last advance a seeded sampler over resumed tokens); the last row's token.
        ``logits``: the head's output for ``hidden`` when already computed. Compute thread."""
        if logits is None:
            logits = self.head_logits(hidden)
        tokens = [sampler.next_token(row) for row in logits]
        return tokens[-1]

    def head_logits(self, hidden: np.ndarray) -> torch.Tensor:
        """[R, H] final hidden states -> [R, V] logits (rows of several requests may be
        stacked: the head is linear per row). Compute thread."""
        return self.runtime.logits(to_torch(np.ascontiguousarray(hidden)))

    async def _embed(self, request: EmbedRequest) -> None:
        if self.config.is_decoder:
            raise ConfigError(f"the model ({self.config.architecture}) is a decoder; use generate")
        rid, entry = request.request_id, self.journal[request.request_id]
        entry.prompt_ids = await self._prompt_ids(request.text, None)
        check_context(len(entry.prompt_ids), 0 + 1, self.config.max_positions + 1)
        hidden, _ = await self._pass(
            rid, 0, np.asarray(entry.prompt_ids, dtype=np.int64), 0, False, None
        )
        pooled = await self._compute(self._pool, hidden, request.normalize)
        self._final(entry, EmbeddingReady(
            request_id=rid,
            embedding=tuple(float(x) for x in pooled),  # type: ignore[attr-defined]
            elapsed_s=time.perf_counter() - entry.arrived_s,
        ))  # fmt: skip

    def _pool(self, hidden: np.ndarray, normalize: bool) -> list[float]:
        """Mean pooling (+ L2 normalisation) on the entry. Compute thread."""
        tensor = to_torch(np.ascontiguousarray(hidden))
        if normalize:
            return self.runtime.pool(tensor).tolist()
        return torch.mean(tensor, dim=0).tolist()

    def embed_tokens(self, token_ids: np.ndarray, position: int) -> np.ndarray:
        """The embedding of [T] token ids -> [T, H] float32. Compute thread."""
        tensor = torch.from_numpy(np.ascontiguousarray(token_ids, dtype=np.int64))
        return self.runtime.embed(tensor, position).numpy()
