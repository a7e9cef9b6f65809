"""The entry role: the trusted node that owns requests end to end.

It tokenizes, embeds, runs its own segment, sends the activation down the pipeline,
receives the final hidden state, runs the head, samples and streams each token to the
client, and loops. It admits a bounded number of requests and journals each one
(prompt, tokens so far) so a later replay can rebuild the pipeline's KV caches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from services.worker.compute import KvMissing
from services.worker.dataplane import NodeLost
from shared.errors import ConfigError, ContextTooLong, StageTimedOut
from shared.messages import (
    EmbeddingReady,
    EmbedRequest,
    GenerateRequest,
    Message,
    RequestFailed,
    RequestFinished,
    TokenGenerated,
)
from shared.model.runtime import EntryRuntime
from shared.model.sampling import Sampler, SamplingParams, check_context, should_stop
from shared.model.tokenizer import TextTokenizer
from shared.tensor_frame import to_torch

log = logging.getLogger(__name__)

# pipeline_pass(request_id, step, token_ids, position, last_only) -> (final hidden, epoch used)
PipelinePass = Callable[[str, int, np.ndarray, int, bool], Awaitable[tuple[np.ndarray, int]]]
Reply = Callable[[str, Message], Awaitable[None]]
Compute = Callable[..., Awaitable[object]]


@dataclass
class JournalEntry:
    """What the entry must remember to replay a request through a new pipeline."""

    request: GenerateRequest | EmbedRequest
    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)
    arrived_s: float = field(default_factory=time.perf_counter)
    kv_epoch: int | None = None
    """The epoch whose pipeline holds this request's KV caches (None: none yet)."""
    replays: int = 0


class EntryRole:
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
        max_replays: int = 3,
    ) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.tokenizer = tokenizer
        self._compute = compute
        self._pass = pipeline_pass
        self._reply = reply
        self.max_in_flight = max_in_flight
        self.max_prompt_tokens = max_prompt_tokens
        self.journal: dict[str, JournalEntry] = {}
        self._current_epoch = current_epoch
        self._handoff = handoff
        self._wait_for_epoch = wait_for_epoch
        self.failover_wait_s = failover_wait_s
        self.max_replays = max_replays

    def admit(self, request: GenerateRequest | EmbedRequest) -> RequestFailed | None:
        """None if the request may start now, else the typed refusal to send back."""
        if request.request_id in self.journal:
            return RequestFailed(
                request_id=request.request_id,
                error="invalid_request",
                message=f"request {request.request_id} is already in flight",
            )
        if len(self.journal) >= self.max_in_flight:
            return RequestFailed(
                request_id=request.request_id,
                error="busy",
                message=f"entry node has {len(self.journal)} requests in flight (the bound); retry later",
            )
        return None

    async def serve(self, request: GenerateRequest | EmbedRequest) -> None:
        """Run one admitted request to completion; every failure becomes RequestFailed."""
        rid = request.request_id
        self.journal[rid] = JournalEntry(request, [])
        try:
            async with asyncio.timeout(request.timeout_s):
                if isinstance(request, GenerateRequest):
                    await self._generate(request)
                else:
                    await self._embed(request)
        except TimeoutError:
            await self._fail(rid, "timeout", f"request did not finish within {request.timeout_s} s")
        except StageTimedOut as error:
            await self._fail(rid, "timeout", str(error))
        except ContextTooLong as error:
            await self._fail(rid, "context_too_long", str(error))
        except ConfigError as error:
            await self._fail(rid, "invalid_request", str(error))
        except Exception as error:  # one request's failure must not stop the node
            log.exception("request %s failed", rid)
            await self._fail(rid, "internal", f"{type(error).__name__}: {error}")
        finally:
            self.journal.pop(rid, None)

    async def _fail(self, rid: str, error: str, message: str) -> None:
        entry = self.journal.get(rid)
        if entry is None:
            return
        await self._reply(
            entry.request.reply_to,
            RequestFailed(request_id=rid, error=error, message=message[:1024]),  # type: ignore[arg-type]
        )

    def _prompt_ids(self, prompt: str | None, token_ids: tuple[int, ...] | None) -> list[int]:
        ids = list(token_ids) if token_ids is not None else self.tokenizer.encode(prompt or "")
        vocab = self.config.vocab_size
        bad = [token for token in ids if token >= vocab]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary of {vocab}")
        if len(ids) > self.max_prompt_tokens:
            raise ContextTooLong(
                f"prompt of {len(ids)} tokens exceeds this entry's limit of {self.max_prompt_tokens}"
            )
        return ids

    async def _generate(self, request: GenerateRequest) -> None:
        if not self.config.is_decoder:
            raise ConfigError(f"the model ({self.config.architecture}) is an encoder; use embed")
        rid, entry = request.request_id, self.journal[request.request_id]
        entry.prompt_ids = self._prompt_ids(request.prompt, request.token_ids)
        check_context(len(entry.prompt_ids), request.max_new_tokens, self.config.max_positions)
        sampler = Sampler(SamplingParams(request.temperature, request.top_p, request.seed))
        stream = self.tokenizer.stream()
        step_input, position, first_at = entry.prompt_ids, 0, 0.0
        while True:
            step = len(entry.generated)
            hidden = await self._step(entry, step, step_input, position)
            token = int(await self._compute(self._sample, hidden, sampler))  # type: ignore[call-overload]
            entry.generated.append(token)
            if step == 0:
                first_at = time.perf_counter()
            await self._reply(
                request.reply_to,
                TokenGenerated(request_id=rid, index=step, token_id=token, text=stream.push(token)[:1024]),
            )
            eos = token in self.config.eos_token_ids
            if should_stop(token, len(entry.generated), request.max_new_tokens, self.config.eos_token_ids):
                break
            position += len(step_input)
            step_input = [token]
        done_at = time.perf_counter()
        count = len(entry.generated)
        await self._reply(
            request.reply_to,
            RequestFinished(
                request_id=rid,
                token_ids=tuple(entry.generated),
                text=self.tokenizer.decode(entry.generated)[:65536],
                finish_reason="eos" if eos else "length",
                ttft_s=first_at - entry.arrived_s,
                tpot_s=(done_at - first_at) / (count - 1) if count > 1 else 0.0,
            ),
        )

    async def _step(self, entry: JournalEntry, step: int, step_input: list[int], position: int) -> np.ndarray:
        """One pass for decode step ``step``. When the plan's epoch changed since the
        request's KV caches were built (or a pass timed out across a change), replay the
        journal (prompt + tokens so far) from position 0 through the new pipeline: the
        caches are rebuilt and the client sees identical tokens."""
        rid = entry.request.request_id
        while True:
            epoch = self._current_epoch()
            if step > 0 and entry.kv_epoch != epoch:
                if await self._move_kv(entry, epoch, position):
                    entry.kv_epoch = epoch
                else:
                    step_input, position = entry.prompt_ids + entry.generated, 0
                    entry.replays += 1
                    log.info("request %s: replaying %d tokens in epoch %s", rid, len(step_input), epoch)
            try:
                hidden, entry.kv_epoch = await self._pass(
                    rid, step, np.asarray(step_input, dtype=np.int64), position, True
                )
                return hidden
            except KvMissing:
                if entry.replays >= self.max_replays:
                    raise StageTimedOut(f"request {rid}: KV caches lost {entry.replays} times") from None
                entry.kv_epoch = None  # some node lacks the cache: replay
            except NodeLost as error:
                if entry.replays >= self.max_replays or self._wait_for_epoch is None:
                    raise
                log.info("request %s: %s; waiting up to %.1f s for a new plan", rid, error,
                         self.failover_wait_s)  # fmt: skip
                if not await self._wait_for_epoch(epoch, self.failover_wait_s):
                    raise StageTimedOut(f"{error}; no new plan within {self.failover_wait_s} s") from None
                entry.kv_epoch = None  # the new pipeline rebuilds the caches from the journal
            except StageTimedOut:
                if entry.replays >= self.max_replays or self._current_epoch() == epoch:
                    raise
                entry.kv_epoch = None  # the plan moved under this pass: replay on the new one

    async def _move_kv(self, entry: JournalEntry, epoch: int | None, length: int) -> bool:
        """Hand the request's KV caches over from its old epoch's nodes to the new ones."""
        if self._handoff is None or entry.kv_epoch is None or epoch is None:
            return False
        moved = await self._handoff(entry.request.request_id, entry.kv_epoch, length)
        if moved:
            log.info("request %s: KV handed over from epoch %d to %d", entry.request.request_id,
                     entry.kv_epoch, epoch)  # fmt: skip
        return moved

    def _sample(self, hidden: np.ndarray, sampler: Sampler) -> int:
        """Head + sampling on the final hidden state's last row. Compute thread."""
        logits = self.runtime.logits(to_torch(np.ascontiguousarray(hidden[-1:])))
        return sampler.next_token(logits[0])

    async def _embed(self, request: EmbedRequest) -> None:
        if self.config.is_decoder:
            raise ConfigError(f"the model ({self.config.architecture}) is a decoder; use generate")
        rid, entry = request.request_id, self.journal[request.request_id]
        entry.prompt_ids = self._prompt_ids(request.text, None)
        check_context(len(entry.prompt_ids), 0 + 1, self.config.max_positions + 1)
        hidden, _ = await self._pass(rid, 0, np.asarray(entry.prompt_ids, dtype=np.int64), 0, False)
        pooled = await self._compute(self._pool, hidden, request.normalize)
        await self._reply(
            request.reply_to,
            EmbeddingReady(
                request_id=rid,
                embedding=tuple(float(x) for x in pooled),  # type: ignore[attr-defined]
                elapsed_s=time.perf_counter() - entry.arrived_s,
            ),
        )

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
