"""The interface the HTTP and admin layers use to talk to the engine, whatever runs behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from paged.gateway.outputs import RequestOutput
from paged.shared.sampling_params import SamplingParams


class AdmissionError(Exception):
    """A request the engine refuses up front. `status` is the HTTP status it maps to:
    429 for admission caps (queue full), 400 for a request that can never fit, 503 when no worker
    is ready or the server is draining."""

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


@dataclass(slots=True)
class WorkerMetrics:
    """A point-in-time view of one worker's scheduler and page pool, read at every /metrics scrape."""

    worker: str  # label, e.g. "0"
    ready: bool
    requests_running: int
    requests_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int  # held by live requests (cached-free blocks not counted)
    kv_blocks_free: int  # neither held nor cached
    kv_blocks_cached: int  # cached-free: ref count 0, kept for prefix hits until evicted
    kv_utilization: float  # token slots holding tokens / token slots reserved
    prefix_cache_queries_tokens: int  # counters: monotonically increasing
    prefix_cache_hits_tokens: int
    preemptions: int
    evictions: int
    swaps_out: int
    swaps_in: int


class EngineClient(Protocol):
    max_model_len: int

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
        """Admit the request (raising AdmissionError before the first yield if refused) and yield
        its outputs step by step until finished. Closing or cancelling the iterator aborts the
        request and frees its blocks within one scheduler step."""
        ...

    async def abort(self, request_id: str) -> bool: ...

    def is_ready(self) -> bool:
        """At least one worker registered and the engine not draining."""
        ...

    def is_draining(self) -> bool: ...

    def worker_metrics(self) -> list[WorkerMetrics]: ...
