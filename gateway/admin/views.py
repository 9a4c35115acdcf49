"""What the admin API reports about a running engine: status, per-worker memory maps, requests
and the prefix cache. Read-only, through the EngineAdmin interface (gateway/engine_client.py), and
cheap enough to call at a `pagedctl top` refresh rate."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

import msgspec
from prometheus_client import CollectorRegistry

from paged.gateway.engine_client import EngineAdmin, WorkerView
from paged.gateway.memory_map import CacheSummary, MemoryMap, RequestInfo, cache_summary, memory_map, request_info
from paged.gateway.stats import KVStoreStats, TransferStats, WorkerStats


class Status(msgspec.Struct):
    version: str
    model: str
    served_model_name: str
    uptime_s: float
    draining: bool
    ready: bool
    workers: list[WorkerStats]
    running_seqs: int
    waiting_requests: int
    swapped_requests: int
    generation_tokens: float | None  # counter of generated tokens, for rates (None: no metrics)
    policy: dict[str, object]  # the scheduler and cache settings
    transfers: TransferStats  # KV hand-offs between prefill and decode workers
    stores: list[KVStoreStats] = []  # the host KV stores (docs/kv-store.md); empty without one


def package_version() -> str:
    try:
        return version("paged")
    except PackageNotFoundError:
        return "unknown"


class AdminViews:
    def __init__(
        self, engine: EngineAdmin, served_model_name: str, metrics_registry: CollectorRegistry | None = None
    ) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.metrics_registry = metrics_registry
        self.started = time.monotonic()

    def _worker(self, name: str) -> WorkerView | None:
        return next((worker for worker in self.engine.workers() if worker.name == name), None)

    def status(self) -> Status:
        engine = self.engine
        workers = engine.worker_stats()
        generated = None
        if self.metrics_registry is not None:
            generated = self.metrics_registry.get_sample_value("paged_generation_tokens_total") or 0.0
        return Status(
            version=package_version(),
            model=engine.model,
            served_model_name=self.served_model_name,
            uptime_s=time.monotonic() - self.started,
            draining=engine.is_draining(),
            ready=engine.is_ready(),
            workers=workers,
            running_seqs=sum(w.running_seqs for w in workers),
            waiting_requests=sum(w.waiting_requests for w in workers),
            swapped_requests=sum(w.swapped_requests for w in workers),
            generation_tokens=generated,
            policy={
                "scheduler": msgspec.to_builtins(engine.scheduler_config),
                "cache": msgspec.to_builtins(engine.cache_config),
            },
            transfers=engine.transfer_stats(),
            stores=engine.store_stats(),
        )

    def memory_map(self, name: str) -> MemoryMap | None:
        worker = self._worker(name)
        if worker is None or worker.scheduler is None:
            return None
        return memory_map(worker.scheduler, worker.name)

    def workers(self) -> list[str]:
        return [worker.name for worker in self.engine.workers()]

    def requests(self) -> list[RequestInfo]:
        now = time.monotonic()
        infos = [
            request_info(worker.scheduler, request, worker.name, now)
            for worker in self.engine.workers()
            if worker.scheduler is not None
            for request in worker.scheduler.requests.values()
        ]
        infos.sort(key=lambda info: -info.waiting_s - info.running_s)
        return infos

    def request(self, request_id: str) -> RequestInfo | None:
        for worker in self.engine.workers():
            scheduler = worker.scheduler
            if scheduler is not None and request_id in scheduler.requests:
                return request_info(scheduler, scheduler.requests[request_id], worker.name)
        return None

    def cache(self) -> list[CacheSummary]:
        return [cache_summary(w.scheduler, w.name) for w in self.engine.workers() if w.scheduler is not None]
