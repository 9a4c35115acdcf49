"""The interfaces the HTTP and admin layers use to talk to the engine, whatever runs behind it:
`EngineClient` for the OpenAI API (requests and metrics), `EngineAdmin` for the admin API
(snapshots of each worker and the operator's actions)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from paged.gateway.admission import AdmissionError, Refusal
from paged.gateway.outputs import RequestOutput
from paged.gateway.scheduler import Scheduler
from paged.gateway.stats import KVStoreStats, TransferStats, WorkerStats
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.sampling_params import SamplingParams

__all__ = ["AdmissionError", "EngineAdmin", "EngineClient", "Refusal", "WorkerView"]


class EngineClient(Protocol):
    @property
    def max_model_len(self) -> int:
        """The context window every worker serves (0 before they registered)."""
        ...

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
        """Admit the request (raising AdmissionError, with the kind of refusal, before the first
        yield if refused) and yield its outputs step by step until finished. Closing or cancelling
        the iterator aborts the request and frees its blocks within one scheduler step."""
        ...

    async def abort(self, request_id: str) -> bool: ...

    def is_ready(self) -> bool:
        """At least one worker registered and the engine not draining."""
        ...

    def is_draining(self) -> bool: ...

    def worker_stats(self) -> list[WorkerStats]:
        """One snapshot per worker, read at every /metrics scrape."""
        ...

    def store_stats(self) -> list[KVStoreStats]:
        """One snapshot per host KV store the workers attached (none without --kv-offload-memory)."""
        ...

    def transfer_stats(self) -> TransferStats:
        """The KV hand-offs between prefill and decode workers (zeros without them)."""
        ...


class WorkerView(Protocol):
    """One worker, read only: its name, its snapshot and its scheduler (None while it registers)."""

    @property
    def name(self) -> str: ...

    @property
    def scheduler(self) -> Scheduler | None: ...

    def stats(self) -> WorkerStats: ...


class EngineAdmin(EngineClient, Protocol):
    @property
    def model(self) -> str: ...

    @property
    def scheduler_config(self) -> SchedulerConfig: ...

    @property
    def cache_config(self) -> CacheConfig: ...

    def workers(self) -> Sequence[WorkerView]: ...

    def drain(self) -> None: ...

    def resume(self) -> None: ...

    def flush_prefix_cache(self) -> int: ...

    def flush_kv_store(self) -> int: ...
