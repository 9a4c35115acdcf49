"""AsyncEngine: the gateway's engine front end, implementing EngineClient and EngineAdmin
(gateway/engine_client.py) over worker processes.

It owns the request streams: a request is routed to a replica (gateway/router.py: longest prefix
match, then least load), added to its scheduler, and streamed back as the replica's step loop
dispatches outputs. The workers' lives (spawn, registration, step loops, re-registration) are the
supervisor's (gateway/supervisor.py). When a worker is lost its requests are taken back from its
scheduler and re-added elsewhere (recomputed from their prompt plus the tokens generated so far),
or failed with a clear error when no worker is left. With prefill and decode workers, the KV
hand-off coordinator (gateway/handoff.py) moves requests from the one to the other; the engine
follows them to their new replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from paged.gateway.admission import AdmissionError, Refusal
from paged.gateway.handoff import HandoffCoordinator, HandoffNode
from paged.gateway.outputs import RequestOutput
from paged.gateway.replica import Replica, WorkerSpec
from paged.gateway.request import Request
from paged.gateway.request_streams import TrackedRequest
from paged.gateway.router import route
from paged.gateway.scheduler import Scheduler, uses_kv_store
from paged.gateway.scheduler_stats import SchedulerFigures
from paged.gateway.stats import KVStoreStats, TransferStats, WorkerStats
from paged.gateway.step_pipeline import DEFAULT_DEPTH
from paged.gateway.supervisor import Supervisor
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.logging import get_logger
from paged.shared.protocol import WorkerRegistration
from paged.shared.sampling_params import SamplingParams

log = get_logger("gateway.engine")


class AsyncEngine:
    def __init__(
        self,
        workers: Sequence[WorkerSpec],
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        *,
        registration_timeout: float = 120.0,
        steps_in_flight: int = DEFAULT_DEPTH,  # 1: no overlap (benchmarks compare)
    ) -> None:
        if not workers:
            raise ValueError("the engine needs at least one worker")
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.supervisor = Supervisor(
            workers, cache_config, self._make_scheduler, self._dispatch, self._on_worker_lost,
            registration_timeout=registration_timeout, steps_in_flight=steps_in_flight,
        )  # fmt: skip
        self._requests: dict[str, TrackedRequest] = {}
        self.handoff = HandoffCoordinator(lambda: self.replicas, self._moved)
        self._draining = False
        self._closing = False
        self.exiting_now = False  # a forced exit is under way (exit_now)

    @property
    def replicas(self) -> list[Replica]:
        return self.supervisor.replicas

    @property
    def model(self) -> str:
        return self.supervisor.model

    @property
    def max_model_len(self) -> int:
        return self.supervisor.max_model_len

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start (for serve) and register every worker; raises RegistrationError after the timeout."""
        try:
            await self.supervisor.start()
        except BaseException:
            await self.shutdown()
            raise
        log.info(
            "engine_started", progress=f"workers ready: {len(self.replicas)}, context window {self.max_model_len} tokens",
            workers=len(self.replicas), max_model_len=self.max_model_len, model=self.model,
        )  # fmt: skip

    async def shutdown(self) -> None:
        """Fail what is still running, tell the workers to exit and wait for spawned processes."""
        self._closing = True
        await self.supervisor.stop()
        for tracked in list(self._requests.values()):
            self._fail(tracked, "the server is shutting down")
        await self.supervisor.close()
        log.info("engine_stopped")

    def begin_shutdown(self) -> None:
        """The daemon is going down (after its drain, shutdown()): lost workers are no longer replaced."""
        self.supervisor.stop_replacing()

    def drain(self) -> None:
        """Stop admitting (new requests get 503); running requests finish."""
        self._draining = True
        log.info("engine_draining", requests=len(self._requests))

    def resume(self) -> None:
        """Undo drain(): admit new requests again (the admin API)."""
        self._draining = False
        log.info("engine_resumed")

    def abort_all(self, message: str) -> int:
        """Fail every running request with `message` (a drain that ran out of time, a forced exit): each stream
        ends with that error. Returns how many were aborted."""
        aborted = list(self._requests.values())
        for tracked in aborted:
            self._abort(tracked)
            self._fail(tracked, message)
        return len(aborted)

    def exit_now(self, message: str) -> int:
        """A forced exit (a second stop signal): end every running request with `message` and kill
        the workers, whose supervision stops first (nothing respawns them). Returns how many
        requests were ended."""
        self.exiting_now = True
        aborted = self.abort_all(message)
        self.supervisor.kill_worker_processes()
        return aborted

    def reconfigure_scheduling(self, scheduler_config: SchedulerConfig) -> None:
        """Apply reloaded admission caps and scheduling policy (SIGHUP) to every worker's scheduler,
        and to the ones made when a worker (re)registers."""
        self.scheduler_config = scheduler_config
        for replica in self.replicas:
            if replica.scheduler is not None:
                replica.scheduler.reconfigure(scheduler_config)
                replica.wakeup.set()

    def num_requests(self) -> int:
        return len(self._requests)

    def flush_prefix_cache(self) -> int:
        """Forget every worker's cached-free blocks (the admin API); blocks held by requests keep
        their content. Returns how many blocks were flushed."""
        flushed = sum(r.scheduler.kv.evict_cached_free() for r in self.replicas if r.scheduler is not None)
        log.info("prefix_cache_flushed", blocks=flushed)
        return flushed

    def flush_kv_store(self) -> int:
        """Forget every host KV store's entries that no load in flight reads (the admin API, with
        flush_prefix_cache). Returns how many entries were dropped."""
        flushed = sum(index.flush() for index in self.supervisor.kv_stores.all())
        log.info("kv_store_flushed", entries=flushed)
        return flushed

    async def wait_drained(self) -> None:
        while self._requests:
            await asyncio.sleep(0.05)

    def is_draining(self) -> bool:
        return self._draining

    def is_ready(self) -> bool:
        return not self._draining and any(r.ready for r in self.replicas)

    # --- requests -------------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        eos_token_ids: frozenset[int],
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self._draining or self._closing:
            raise AdmissionError(Refusal.UNAVAILABLE, "the server is draining and admits no new requests")
        if request_id in self._requests:
            raise AdmissionError(Refusal.INVALID, f"request id {request_id!r} is already running")
        request = Request(request_id, list(prompt_token_ids), params, eos_token_ids, priority, cache_salt)
        replica = route(self.replicas, request)
        replica.scheduler.add_request(request)  # type: ignore[union-attr]  # raises AdmissionError
        tracked = TrackedRequest(request, replica)
        self._requests[request_id] = tracked
        replica.wakeup.set()
        finished = False
        try:
            while not finished:
                output = await tracked.outputs.get()
                finished = output.finished
                yield output
        finally:
            if self._requests.get(request_id) is tracked:
                del self._requests[request_id]
                if not finished:
                    self._abort(tracked)

    def worker_of(self, request_id: str) -> str | None:
        """The worker a running request is on (tests use it to see routing)."""
        tracked = self._requests.get(request_id)
        return None if tracked is None else tracked.replica.name

    async def abort(self, request_id: str) -> bool:
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return False
        self._abort(tracked)
        tracked.outputs.put(RequestOutput(request_id, finished=True, error="aborted"))
        return True

    def _abort(self, tracked: TrackedRequest) -> None:
        scheduler = tracked.replica.scheduler
        if scheduler is not None and scheduler.abort_request(tracked.request.request_id):
            tracked.replica.wakeup.set()  # the frees go out with the next step
            log.info("request_aborted", request_id=tracked.request.request_id, worker=tracked.replica.name)

    def _fail(self, tracked: TrackedRequest, message: str) -> None:
        self._requests.pop(tracked.request.request_id, None)
        tracked.outputs.put(RequestOutput(tracked.request.request_id, finished=True, error=message))
        log.warning("request_failed", request_id=tracked.request.request_id, error=message)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to the request streams (the supervisor's step loops call this)."""
        for output in outputs:
            tracked = self._requests.get(output.request_id)
            if tracked is None:
                continue  # aborted meanwhile
            if output.finished:
                del self._requests[output.request_id]
            tracked.deliver(output)

    # --- workers --------------------------------------------------------------------------------

    def _make_scheduler(
        self, name: str, registration: WorkerRegistration, max_model_len: int, figures: SchedulerFigures | None
    ) -> Scheduler:
        store = None
        if uses_kv_store(self.cache_config):
            store = self.supervisor.kv_stores.for_store(
                registration.kv_store_id, registration.num_store_slots, registration.page_bytes, registration.block_context_cost
            )
        scheduler = Scheduler(
            self.scheduler_config, self.cache_config, registration.num_blocks, max_model_len, registration.num_host_blocks,
            store_index=store, worker_name=name, context_cost=registration.block_context_cost, figures=figures,
        )  # fmt: skip
        scheduler.handoff = self.handoff
        return scheduler


    def _moved(self, request: Request, node: HandoffNode) -> None:
        """A request was handed off to another worker: its stream follows it (aborts go there)."""
        tracked = self._requests.get(request.request_id)
        if tracked is not None and tracked.request is request:
            assert isinstance(node, Replica)
            tracked.replica = node

    def _on_worker_lost(self, replica: Replica, scheduler: Scheduler, reason: str) -> None:
        """Move the lost worker's requests to other replicas, or fail them when none can take them."""
        self.handoff.worker_lost(scheduler)
        moved = failed = 0
        for request in scheduler.take_all_requests():
            tracked = self._requests.get(request.request_id)
            if tracked is None:
                continue
            try:
                target = route(self.replicas, request, exclude=replica)
                target.scheduler.add_request(request)  # type: ignore[union-attr]
            except AdmissionError as exc:
                self._fail(tracked, f"worker {replica.name} was lost ({reason}) and the request could not move: {exc.message}")
                failed += 1
                continue
            tracked.replica = target
            target.wakeup.set()
            moved += 1
        log.warning("worker_requests_moved", worker=replica.name, reason=reason, moved=moved, failed=failed)

    # --- snapshots ------------------------------------------------------------------------------

    def worker_stats(self) -> list[WorkerStats]:
        return [replica.stats() for replica in self.replicas]

    def store_stats(self) -> list[KVStoreStats]:
        return [index.stats() for index in self.supervisor.kv_stores.all()]

    def transfer_stats(self) -> TransferStats:
        return self.handoff.snapshot()

    def workers(self) -> list[Replica]:
        return list(self.replicas)
