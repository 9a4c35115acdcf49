"""What the admin API reports about a running AsyncEngine: status, per-worker memory maps, requests
and the prefix cache. Read-only, and cheap enough to call at a `pagedctl top` refresh rate."""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

import msgspec
from prometheus_client import CollectorRegistry

from paged.gateway.engine import AsyncEngine, _Replica
from paged.gateway.memory_map import CacheSummary, MemoryMap, RequestInfo, cache_summary, memory_map, request_info


class WorkerStatus(msgspec.Struct):
    name: str
    state: str  # "ready", "disconnected" (link down, not yet declared lost) or "registering"
    endpoint: str
    num_blocks: int
    block_size: int
    running_seqs: int
    waiting_requests: int
    swapped_requests: int
    used_blocks: int
    cached_blocks: int
    free_blocks: int
    kv_utilization: float
    prefix_hit_rate: float
    preemptions: int
    steps: int


class Status(msgspec.Struct):
    version: str
    model: str
    served_model_name: str
    uptime_s: float
    draining: bool
    ready: bool
    workers: list[WorkerStatus]
    running_seqs: int
    waiting_requests: int
    swapped_requests: int
    generation_tokens: float | None  # counter of generated tokens, for rates (None: no metrics)
    policy: dict[str, object]  # the scheduler and cache settings


def package_version() -> str:
    try:
        return version("paged")
    except PackageNotFoundError:
        return "unknown"


class AdminViews:
    def __init__(
        self, engine: AsyncEngine, served_model_name: str, metrics_registry: CollectorRegistry | None = None
    ) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.metrics_registry = metrics_registry
        self.started = time.monotonic()

    def _replica(self, worker: str) -> _Replica | None:
        return next((r for r in self.engine.replicas if r.name == worker), None)

    def status(self) -> Status:
        engine = self.engine
        workers = [_worker_status(replica) for replica in engine.replicas]
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
        )

    def memory_map(self, worker: str) -> MemoryMap | None:
        replica = self._replica(worker)
        if replica is None or replica.scheduler is None:
            return None
        return memory_map(replica.scheduler, replica.name)

    def workers(self) -> list[str]:
        return [replica.name for replica in self.engine.replicas]

    def requests(self) -> list[RequestInfo]:
        now = time.monotonic()
        infos = [
            request_info(replica.scheduler, request, replica.name, now)
            for replica in self.engine.replicas
            if replica.scheduler is not None
            for request in replica.scheduler.requests.values()
        ]
        infos.sort(key=lambda info: -info.waiting_s - info.running_s)
        return infos

    def request(self, request_id: str) -> RequestInfo | None:
        for replica in self.engine.replicas:
            scheduler = replica.scheduler
            if scheduler is not None and request_id in scheduler.requests:
                return request_info(scheduler, scheduler.requests[request_id], replica.name)
        return None

    def cache(self) -> list[CacheSummary]:
        return [cache_summary(r.scheduler, r.name) for r in self.engine.replicas if r.scheduler is not None]


def _worker_status(replica: _Replica) -> WorkerStatus:
    scheduler = replica.scheduler
    registration = replica.registration
    if scheduler is None:
        return WorkerStatus(
            replica.name, "registering", replica.spec.endpoint, registration.num_blocks if registration else 0,
            registration.block_size if registration else 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0, replica.stats.steps,
        )  # fmt: skip
    stats = scheduler.stats()
    queries = stats.prefix_queries_tokens
    return WorkerStatus(
        name=replica.name,
        state="ready" if replica.ready else "disconnected",
        endpoint=replica.spec.endpoint,
        num_blocks=stats.num_blocks,
        block_size=scheduler.cache_config.block_size,
        running_seqs=stats.num_running,
        waiting_requests=stats.num_waiting,
        swapped_requests=stats.num_swapped,
        used_blocks=stats.used_blocks,
        cached_blocks=stats.cached_blocks,
        free_blocks=stats.free_blocks,
        kv_utilization=stats.kv_utilization,
        prefix_hit_rate=stats.prefix_hits_tokens / queries if queries else 0.0,
        preemptions=stats.preemptions,
        steps=replica.stats.steps,
    )
