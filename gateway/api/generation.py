"""One API request's generation: its prompts sent to the engine as concurrent engine requests,
their token deltas turned into text per choice (incremental detokenization, stop strings),
request metrics recorded, and everything aborted when the caller stops listening.

Choice indexes follow OpenAI: prompt i's sequence j is choice i * n + j.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from paged.gateway.api.detokenizer import IncrementalDetokenizer
from paged.gateway.api.errors import APIError
from paged.gateway.api.metrics import Metrics
from paged.gateway.api.stop_strings import StopStringMatcher
from paged.gateway.engine_client import AdmissionError, EngineClient
from paged.gateway.outputs import RequestOutput, SequenceDelta
from paged.shared.logging import get_logger
from paged.shared.protocol import TokenLogprob
from paged.shared.sampling_params import SamplingParams
from paged.shared.tokenizer import Tokenizer

log = get_logger("gateway.api")


@dataclass(slots=True)
class ChoiceUpdate:
    """What one choice gained from one engine output."""

    index: int
    text: str
    token_ids: list[int]  # tokens consumed (a token after a stop string is not)
    logprobs: list[float] | None
    top_logprobs: list[list[TokenLogprob]] | None
    finish_reason: str | None


class GenerationFailed(Exception):
    """The engine failed the request after it was admitted; the client gets `error`."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class _Choice:
    def __init__(self, index: int, tokenizer: Tokenizer, prompt: list[int], stop: list[str]) -> None:
        self.index = index
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        self.stops = StopStringMatcher(stop)
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def apply(self, delta: SequenceDelta) -> ChoiceUpdate | None:
        if self.finish_reason is not None:
            return None  # stopped by a stop string while its siblings (n > 1) run on
        pieces: list[str] = []
        used = 0
        finish = None
        for token_id in delta.token_ids:
            used += 1
            text, stopped = self.stops.feed(self.detokenizer.add(token_id))
            pieces.append(text)
            if stopped:
                finish = "stop"
                break
        if finish is None and delta.finish_reason is not None:
            text, stopped = self.stops.feed(self.detokenizer.flush())
            pieces.append(text if stopped else text + self.stops.flush())
            finish = "stop" if stopped else delta.finish_reason
        self.num_tokens += used
        self.finish_reason = finish
        return ChoiceUpdate(
            index=self.index,
            text="".join(pieces),
            token_ids=delta.token_ids[:used],
            logprobs=delta.logprobs[:used] if delta.logprobs is not None else None,
            top_logprobs=delta.top_logprobs[:used] if delta.top_logprobs is not None else None,
            finish_reason=finish,
        )


class _EngineRequest:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, choices: list[_Choice]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.choices = choices
        self.num_cached_tokens = 0
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.token_outputs = 0  # outputs that carried tokens, for time per output token
        self.done = False  # no more outputs wanted
        self.engine_finished = False  # the engine reported its last output
        self.task: asyncio.Task[None] | None = None

    @property
    def all_choices_finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


_END = object()  # an engine request's output stream ended normally


class Generation:
    def __init__(
        self,
        engine: EngineClient,
        tokenizer: Tokenizer,
        metrics: Metrics,
        request_id: str,
        prompts: list[tuple[list[int], SamplingParams]],
        stop: list[str],
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._metrics = metrics
        self._priority = priority
        self._cache_salt = cache_salt
        self._queue: asyncio.Queue[tuple[_EngineRequest, object]] = asyncio.Queue()
        self._early: deque[tuple[_EngineRequest, object]] = deque()
        self._requests: list[_EngineRequest] = []
        for i, (prompt, params) in enumerate(prompts):
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            choices = [_Choice(i * params.n + j, tokenizer, prompt, stop) for j in range(params.n)]
            self._requests.append(_EngineRequest(engine_id, prompt, params, choices))

    @property
    def num_choices(self) -> int:
        return sum(len(r.choices) for r in self._requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self._requests)

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for r in self._requests for c in r.choices)

    @property
    def cached_tokens(self) -> int:
        return sum(r.num_cached_tokens for r in self._requests)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    async def start(self) -> None:
        """Submit every prompt and wait until each has been admitted (its first output), so that
        a refusal is still an HTTP status rather than an error inside a stream."""
        for request in self._requests:
            request.task = asyncio.create_task(self._pump(request))
        waiting = set(self._requests)
        try:
            while waiting:
                request, item = await self._queue.get()
                if isinstance(item, AdmissionError):
                    request.done = True  # refused, never ran: not counted as finished
                    raise APIError.from_admission(item)
                self._early.append((request, item))
                waiting.discard(request)
        except BaseException:
            await self.close()
            raise
        for request in self._requests:
            self._metrics.prompt_tokens.inc(len(request.prompt))

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        """Choice updates as engine outputs arrive, until every choice has finished. Raises
        GenerationFailed if the engine fails the request."""
        while not all(r.done for r in self._requests):
            request, item = self._early.popleft() if self._early else await self._queue.get()
            if request.done:
                continue
            if item is _END:
                self._finish(request, "abort")  # the engine ended it without a finish reason
                continue
            if isinstance(item, BaseException) or (isinstance(item, RequestOutput) and item.error):
                self._finish(request, "error")
                message = item.error if isinstance(item, RequestOutput) else "internal error"
                raise GenerationFailed(APIError(500, f"generation failed: {message}", code="generation_failed"))
            assert isinstance(item, RequestOutput)
            updates = self._apply(request, item)
            if request.all_choices_finished:
                self._finish(request, None)
            if updates:
                yield updates

    async def close(self) -> None:
        """Abort whatever is still running (client gone, stop string, failure) and wait until the
        engine iterators are closed."""
        for request in self._requests:
            if not request.done:
                self._finish(request, "abort")
            if request.task is not None and not request.engine_finished:
                request.task.cancel()  # cancelling the engine iterator aborts the engine request
        await asyncio.gather(*(r.task for r in self._requests if r.task is not None), return_exceptions=True)

    async def _pump(self, request: _EngineRequest) -> None:
        outputs = self._engine.generate(
            request.request_id,
            request.prompt,
            request.params,
            eos_token_ids=self._tokenizer.eos_token_ids,
            priority=self._priority,
            cache_salt=self._cache_salt,
        )
        try:
            async for output in outputs:
                self._queue.put_nowait((request, output))
        except AdmissionError as e:
            self._queue.put_nowait((request, e))
        except Exception as e:
            log.exception("engine.stream_failed", engine_request_id=request.request_id)
            self._queue.put_nowait((request, e))
        else:
            self._queue.put_nowait((request, _END))
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    def _apply(self, request: _EngineRequest, output: RequestOutput) -> list[ChoiceUpdate]:
        now = time.perf_counter()
        request.engine_finished = output.finished
        request.num_cached_tokens = max(request.num_cached_tokens, output.num_cached_tokens)
        if output.queue_s is not None:
            self._metrics.queue_time.observe(output.queue_s)
        updates = []
        for delta in output.deltas:
            update = request.choices[delta.index].apply(delta)
            if update is not None:
                self._metrics.generation_tokens.inc(len(update.token_ids))  # live, for tokens/s while requests run
            # Tokens that add no text yet (half a character, a held-back stop-string prefix) make no
            # update of their own, unless their logprobs must be sent: streams carry no empty chunks.
            if update is not None and (update.text or update.logprobs or update.finish_reason):
                updates.append(update)
        if any(d.token_ids for d in output.deltas):
            if request.first_token_at is None:
                request.first_token_at = now
                self._metrics.time_to_first_token.observe(now - request.arrival)
            request.last_token_at = now
            request.token_outputs += 1
        return updates

    def _finish(self, request: _EngineRequest, reason: str | None) -> None:
        """Record a finished engine request; `reason` overrides unfinished choices' reasons."""
        request.done = True
        if request.task is not None and not request.engine_finished:
            request.task.cancel()  # e.g. every choice hit a stop string: abort the rest of the generation
        now = time.perf_counter()
        tokens = sum(c.num_tokens for c in request.choices)
        for choice in request.choices:
            self._metrics.requests_finished.labels(choice.finish_reason or reason or "abort").inc()
        self._metrics.e2e_latency.observe(now - request.arrival)
        if request.first_token_at is not None and request.last_token_at is not None and request.token_outputs > 1:
            self._metrics.time_per_output_token.observe(
                (request.last_token_at - request.first_token_at) / (request.token_outputs - 1)
            )
        log.info(
            "request.finished",
            engine_request_id=request.request_id,
            reason=reason or ",".join(sorted({c.finish_reason or "" for c in request.choices})),
            prompt_tokens=len(request.prompt),
            completion_tokens=tokens,
            cached_tokens=request.num_cached_tokens,
        )
