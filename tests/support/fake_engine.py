"""A deterministic stand-in for the engine behind the HTTP API (gateway.engine_client.EngineClient).

Each sequence "generates" the tokens of a script, one step at a time, honouring max_tokens, EOS,
stop_token_ids and ignore_eos like the real scheduler. Knobs make it refuse admission, fail in
the middle of a stream, or stream slowly; it records what it was asked and what was aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from paged.gateway.engine_client import AdmissionError
from paged.gateway.stats import KVStoreStats, TransferStats, WorkerStats
from paged.gateway.outputs import RequestOutput, SequenceDelta
from paged.shared.protocol import TokenLogprob
from paged.shared.sampling_params import SamplingParams

# Token ids of stories260K's vocabulary: "▁Once", "▁upon", "▁a", "▁time" ... ; any ids < 512 work.
Script = Callable[[list[int], int], list[int]]


def cycling_script(tokens: list[int]) -> Script:
    """Sequence j repeats `tokens` starting j tokens in, so the n choices differ."""

    def script(prompt: list[int], j: int) -> list[int]:
        return [tokens[(j + k) % len(tokens)] for k in range(4096)]

    return script


@dataclass
class Submitted:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    priority: int
    cache_salt: str | None


class FakeEngine:
    def __init__(self, script: Script, max_model_len: int = 512, *, tokens_per_step: int = 1, step_delay_s: float = 0.0) -> None:
        self.max_model_len = max_model_len
        self.script = script
        self.tokens_per_step = tokens_per_step
        self.step_delay_s = step_delay_s
        self.refusal: AdmissionError | None = None
        self.fail_after_steps: int | None = None  # an output with `error` after this many steps
        self.raise_after_steps: int | None = None  # an exception out of the iterator instead
        self.cached_tokens = 0
        self.ready = True
        self.draining = False
        self.submitted: list[Submitted] = []
        self.live: set[str] = set()
        self.aborted: list[str] = []
        self.completed: list[str] = []

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        eos_token_ids: frozenset[int],
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.submitted.append(Submitted(request_id, list(prompt_token_ids), params, eos_token_ids, priority, cache_salt))
        return self._run(request_id, prompt_token_ids, params, eos_token_ids)

    async def _run(
        self, request_id: str, prompt: list[int], params: SamplingParams, eos: frozenset[int]
    ) -> AsyncIterator[RequestOutput]:
        if self.refusal is not None:
            raise self.refusal
        sequences = [self._sequence(prompt, j, params, eos) for j in range(params.n)]
        self.live.add(request_id)
        finished = False
        try:
            step = 0
            while any(sequences):
                if self.step_delay_s:
                    await asyncio.sleep(self.step_delay_s)
                else:
                    await asyncio.sleep(0)
                if self.raise_after_steps is not None and step >= self.raise_after_steps:
                    raise RuntimeError("fake engine exploded")
                if self.fail_after_steps is not None and step >= self.fail_after_steps:
                    finished = True
                    yield RequestOutput(request_id, error="worker lost", finished=True)
                    return
                deltas = []
                for j, (tokens, reason) in enumerate(sequences):
                    if not tokens:
                        continue
                    now, rest = tokens[: self.tokens_per_step], tokens[self.tokens_per_step :]
                    sequences[j] = (rest, reason)
                    deltas.append(SequenceDelta(j, now, *self._logprobs(now, params), finish_reason=None if rest else reason))
                step += 1
                finished = not any(sequences)
                yield RequestOutput(
                    request_id,
                    deltas,
                    num_prompt_tokens=len(prompt),
                    num_cached_tokens=self.cached_tokens,
                    queue_s=0.001 if step == 1 else None,
                    finished=finished,
                )
        finally:
            self.live.discard(request_id)
            (self.completed if finished else self.aborted).append(request_id)

    def _sequence(self, prompt: list[int], j: int, params: SamplingParams, eos: frozenset[int]) -> tuple[list[int], str]:
        tokens: list[int] = []
        for token in self.script(prompt, j):
            tokens.append(token)
            if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
                return tokens, "stop"
            if len(tokens) == params.max_tokens:
                return tokens, "length"
        return tokens, "stop"

    @staticmethod
    def _logprobs(tokens: list[int], params: SamplingParams) -> tuple[list[float] | None, list[list[TokenLogprob]] | None]:
        if params.logprobs is None:
            return None, None
        logprobs = [-0.25 for _ in tokens]
        top = [[TokenLogprob(t, -0.25)] + [TokenLogprob(100 + k, -2.0 - k) for k in range(params.logprobs - 1)] for t in tokens]
        return logprobs, [alts[: params.logprobs] for alts in top]

    async def abort(self, request_id: str) -> bool:
        return request_id in self.live

    def is_ready(self) -> bool:
        return self.ready and not self.draining

    def is_draining(self) -> bool:
        return self.draining

    def store_stats(self) -> list[KVStoreStats]:
        store = KVStoreStats(
            store_id="host", policy="lru", num_slots=100, page_bytes=1024, free_slots=60, saving_slots=2,
            ready_slots=38, pinned_slots=1, quarantined_slots=0, saves=50, loads=12, evictions=3, failed_saves=2,
            failed_loads=1,
        )  # fmt: skip
        store.load_seconds.observe(0.0002)
        return [store]

    def worker_stats(self) -> list[WorkerStats]:
        used = 2 * len(self.live)
        return [
            WorkerStats(
                name="0", state="ready" if self.ready else "registering", endpoint="fake", running_requests=len(self.live),
                num_blocks=64, block_size=16, used_blocks=used, free_blocks=64 - used - 3, cached_blocks=3,
                slots_reserved=used * 16, slots_filled=used * 12, prefix_queries_tokens=100, prefix_hits_tokens=40,
                preemptions=1, evictions=2, computed_tokens=1000, recomputed_tokens=250, window_s=10.0, goodput=0.75,
                preemptions_per_s=0.5, evictions_per_s=3.0, window_prefix_hit_rate=0.4, kv_thrashing=True,
            )
        ]

    def transfer_stats(self) -> TransferStats:
        return TransferStats()
