"""AsyncEngine: the gateway's engine, one scheduler per worker process (data-parallel replicas).

Each registered worker gets its own Scheduler (its own page pool) and a step loop that keeps the
worker busy with overlapped scheduling: step N+1 is scheduled and sent while the worker runs step N,
so one step always waits in the worker's queue. A new request goes to the worker whose prefix cache
already holds the longest part of its prompt, otherwise to the least loaded one.

When a worker is lost its requests are taken back from its scheduler and re-added elsewhere
(recomputed from their prompt plus the tokens generated so far), or failed with a clear error when
no worker is left; the worker is taken back, with a fresh scheduler, when it registers again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import zmq.asyncio

from paged.gateway.engine_client import AdmissionError, WorkerMetrics
from paged.gateway.kv_cache_manager import KVCacheManager
from paged.gateway.outputs import RequestOutput
from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.gateway.worker_link import ChildProcess, RegistrationError, WorkerLink, WorkerLost
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.logging import get_logger
from paged.shared.protocol import StepInput, StepOutput, WorkerRegistration
from paged.shared.sampling_params import SamplingParams

log = get_logger("gateway.engine")

OVERLAPPED_STEPS = 2  # steps in flight: the one the worker runs and the one waiting behind it
LOAD_LOG_INTERVAL_S = 10.0
REREGISTER_RETRY_S = 1.0


@dataclass(slots=True)
class WorkerSpec:
    """Where a worker listens, and for `pagedd serve` how to (re)start its process."""

    endpoint: str
    spawn: Callable[[], ChildProcess] | None = None


@dataclass(slots=True)
class StepLoopStats:
    """Gateway CPU time per step by phase, and the worker's idle fraction while it had work queued."""

    steps: int = 0
    schedule_s: float = 0.0
    send_s: float = 0.0  # encode + send
    update_s: float = 0.0  # scheduler.update
    dispatch_s: float = 0.0  # hand-off of the outputs to the request streams
    worker_busy_s: float = 0.0  # the worker's own total_s per step
    loaded_s: float = 0.0  # wall time with at least one step in flight
    started: float = field(default_factory=time.perf_counter)

    def gateway_s_per_step(self, decode_s: float = 0.0) -> float:
        return (self.schedule_s + self.send_s + self.update_s + self.dispatch_s + decode_s) / max(self.steps, 1)

    def idle_fraction(self) -> float:
        return 0.0 if self.loaded_s <= 0 else max(0.0, 1.0 - self.worker_busy_s / self.loaded_s)


class _Replica:
    """One worker: its link, its scheduler while registered, and the event that wakes its step loop."""

    def __init__(self, index: int, spec: WorkerSpec, link: WorkerLink) -> None:
        self.name = str(index)
        self.spec = spec
        self.link = link
        self.scheduler: Scheduler | None = None
        self.registration: WorkerRegistration | None = None
        self.wakeup = asyncio.Event()
        self.stats = StepLoopStats()
        self.task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and self.link.connected

    @property
    def load(self) -> int:
        assert self.scheduler is not None
        return self.scheduler.num_running + self.scheduler.num_waiting


class _OutputStream:
    """One request's outputs, in order, for its single consumer. The step loop feeds one per running
    request every step, so this is asyncio.Queue cut down to what that needs (no size bound, no
    task accounting, at most one waiter), which makes a put and its get about a third cheaper."""

    __slots__ = ("_outputs", "_waiter")

    def __init__(self) -> None:
        self._outputs: deque[RequestOutput] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, output: RequestOutput) -> None:
        self._outputs.append(output)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # its consumer may have been cancelled
                waiter.set_result(None)

    async def get(self) -> RequestOutput:
        while not self._outputs:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._outputs.popleft()


@dataclass(slots=True)
class _Tracked:
    """A request the engine streams outputs for, and the replica that currently runs it."""

    request: Request
    replica: _Replica
    outputs: _OutputStream = field(default_factory=_OutputStream)
    answered: bool = False  # an output was handed to the stream (the first carries queue_s)


class AsyncEngine:
    """Implements gateway.engine_client.EngineClient over worker processes."""

    def __init__(
        self,
        workers: Sequence[WorkerSpec],
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        *,
        registration_timeout: float = 120.0,
        steps_in_flight: int = OVERLAPPED_STEPS,  # 1: no overlap (benchmarks compare)
    ) -> None:
        if not workers:
            raise ValueError("the engine needs at least one worker")
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.registration_timeout = registration_timeout
        self.steps_in_flight = steps_in_flight
        self.gateway_id = uuid.uuid4().hex[:12]
        self.context = zmq.asyncio.Context()
        self.replicas = [
            _Replica(i, spec, WorkerLink(self.context, spec.endpoint, name=str(i), gateway_id=self.gateway_id, accept=self._accept))
            for i, spec in enumerate(workers)
        ]
        self.max_model_len = 0
        self.model = ""
        self._requests: dict[str, _Tracked] = {}
        self._draining = False
        self._closing = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start (for serve) and register every worker; raises RegistrationError after the timeout."""
        for replica in self.replicas:
            self._spawn_if_needed(replica)
        try:
            registrations = await asyncio.gather(*(r.link.register(self.registration_timeout) for r in self.replicas))
        except BaseException:
            await self.shutdown()
            raise
        self.max_model_len = min(registration.max_model_len for registration in registrations)
        for replica, registration in zip(self.replicas, registrations):
            self._attach(replica, registration)
            replica.task = asyncio.create_task(self._serve_worker(replica), name=f"worker-{replica.name}")
        log.info("engine_started", workers=len(self.replicas), max_model_len=self.max_model_len, model=self.model)

    async def shutdown(self) -> None:
        """Fail what is still running, tell the workers to exit and wait for spawned processes."""
        self._closing = True
        tasks = [r.task for r in self.replicas if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for tracked in list(self._requests.values()):
            self._fail(tracked, "the server is shutting down")
        await asyncio.gather(*(r.link.close() for r in self.replicas))
        for replica in self.replicas:
            process = replica.link.process
            if process is not None:
                await asyncio.to_thread(_stop_process, process)
        self.context.term()
        log.info("engine_stopped")

    def drain(self) -> None:
        """Stop admitting (new requests get 503); running requests finish."""
        self._draining = True
        log.info("engine_draining", requests=len(self._requests))

    def resume(self) -> None:
        """Undo drain(): admit new requests again (the admin API)."""
        self._draining = False
        log.info("engine_resumed")

    def abort_all(self, message: str) -> int:
        """Fail every running request with `message` (a drain that ran out of time): each stream
        ends with that error. Returns how many were aborted."""
        aborted = list(self._requests.values())
        for tracked in aborted:
            self._abort(tracked)
            self._fail(tracked, message)
        return len(aborted)

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

    def kill_worker_processes(self) -> None:
        """SIGKILL the spawned workers now (a second stop signal: exit without draining)."""
        for replica in self.replicas:
            process = replica.link.process
            if process is not None and process.exitcode is None:
                process.kill()  # type: ignore[attr-defined]

    def flush_prefix_cache(self) -> int:
        """Forget every worker's cached-free blocks (the admin API); blocks held by requests keep
        their content. Returns how many blocks were flushed."""
        flushed = sum(
            r.scheduler.kv.pool.evict_cached_free()
            for r in self.replicas
            if r.scheduler is not None and isinstance(r.scheduler.kv, KVCacheManager)
        )
        log.info("prefix_cache_flushed", blocks=flushed)
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
            raise AdmissionError("the server is draining and admits no new requests", 503)
        if request_id in self._requests:
            raise AdmissionError(f"request id {request_id!r} is already running", 400)
        request = Request(request_id, list(prompt_token_ids), params, eos_token_ids, priority, cache_salt)
        replica = self._route(request)
        replica.scheduler.add_request(request)  # type: ignore[union-attr]  # raises AdmissionError
        tracked = _Tracked(request, replica)
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

    def _abort(self, tracked: _Tracked) -> None:
        scheduler = tracked.replica.scheduler
        if scheduler is not None and scheduler.abort_request(tracked.request.request_id):
            tracked.replica.wakeup.set()  # the frees go out with the next step
            log.info("request_aborted", request_id=tracked.request.request_id, worker=tracked.replica.name)

    def _route(self, request: Request, exclude: _Replica | None = None) -> _Replica:
        """Longest prefix-cache match first, then least loaded."""
        ready = [r for r in self.replicas if r.ready and r is not exclude]
        if not ready:
            raise AdmissionError("no worker is ready", 503)
        if len(ready) == 1:
            return ready[0]
        matches = {r: r.scheduler.prefix_match_tokens(request.prompt_token_ids, request.cache_salt) for r in ready}  # type: ignore[union-attr]
        best = max(ready, key=lambda r: (matches[r], -r.load))
        log.debug("request_routed", request_id=request.request_id, worker=best.name, prefix_match_tokens=matches[best])
        return best

    def _fail(self, tracked: _Tracked, message: str) -> None:
        self._requests.pop(tracked.request.request_id, None)
        tracked.outputs.put(RequestOutput(tracked.request.request_id, finished=True, error=message))
        log.warning("request_failed", request_id=tracked.request.request_id, error=message)

    # --- workers --------------------------------------------------------------------------------

    def _accept(self, registration: WorkerRegistration) -> str | None:
        """Refuse a worker that cannot join this gateway's replicas (None: accept)."""
        if registration.block_size != self.cache_config.block_size:
            return f"worker block_size {registration.block_size} differs from the gateway's {self.cache_config.block_size}"
        if self.model and registration.model != self.model:
            return f"worker serves model {registration.model!r}, the other workers {self.model!r}"
        if self.max_model_len and registration.max_model_len < self.max_model_len:
            return f"worker max_model_len {registration.max_model_len} is below the gateway's {self.max_model_len}"
        return None

    def _attach(self, replica: _Replica, registration: WorkerRegistration) -> None:
        self.model = self.model or registration.model
        replica.registration = registration
        replica.scheduler = Scheduler(
            self.scheduler_config, self.cache_config, registration.num_blocks, self.max_model_len, registration.num_host_blocks
        )
        replica.stats = StepLoopStats()
        replica.wakeup.set()

    def _spawn_if_needed(self, replica: _Replica) -> None:
        process = replica.link.process
        if replica.spec.spawn is not None and (process is None or process.exitcode is not None):
            replica.link.process = replica.spec.spawn()

    async def _serve_worker(self, replica: _Replica) -> None:
        """Run the worker's step loop; when it is lost, hand its requests on and re-register it
        (a new session: the worker starts empty)."""
        while True:
            try:
                await self._step_loop(replica)
            except WorkerLost as lost:
                self._on_worker_lost(replica, str(lost))
                process = replica.link.process
                if replica.spec.spawn is not None and process is not None and process.exitcode is None:
                    process.kill()  # type: ignore[attr-defined]  # hung: a fresh process replaces it
                    await asyncio.to_thread(process.join, 5)
            except Exception as exc:  # a gateway bug must not silently strand this worker's requests
                log.exception("step_loop_failed", worker=replica.name)
                self._on_worker_lost(replica, f"gateway error in the step loop: {exc!r}")
            while True:
                self._spawn_if_needed(replica)
                try:
                    registration = await replica.link.register(timeout=self.registration_timeout)
                    break
                except RegistrationError as exc:
                    log.warning("worker_reregistration_failed", worker=replica.name, error=str(exc))
                    await asyncio.sleep(REREGISTER_RETRY_S)
            self._attach(replica, registration)
            log.info("worker_rejoined", worker=replica.name)

    async def _step_loop(self, replica: _Replica) -> None:
        scheduler, link = replica.scheduler, replica.link
        assert scheduler is not None
        # Steps in schedule order, each with whether it was sent; an empty step is never sent and is
        # answered with an empty output when its turn comes, so update() always follows step order.
        in_flight: deque[tuple[StepInput, bool]] = deque()
        # Gateway phases are timed in thread CPU time (what the gateway spends, whatever else the
        # host runs); the worker's load in wall time.
        cpu, wall = time.thread_time, time.perf_counter
        loaded_since = 0.0
        next_log = wall() + LOAD_LOG_INTERVAL_S
        while True:
            replica.wakeup.clear()
            stats = replica.stats  # replaceable from outside, to measure a window
            while len(in_flight) < self.steps_in_flight and (scheduler.has_unfinished_requests() or not in_flight):
                t0 = cpu()
                step = scheduler.schedule()
                t1 = cpu()
                stats.schedule_s += t1 - t0
                sent = _has_work(step)
                if sent:
                    await link.send_step(step)
                    stats.send_s += cpu() - t1
                    if not in_flight:
                        loaded_since = wall()
                in_flight.append((step, sent))
                if not sent:
                    break
            while in_flight and not in_flight[0][1]:
                step = in_flight.popleft()[0]
                self._dispatch(scheduler.update(step, StepOutput(step_id=step.step_id)))
            if not in_flight:
                await _wait_any(replica.wakeup, link.lost)
                if link.lost.is_set():
                    raise WorkerLost(link.lost_reason or "worker lost")
                continue
            output = await link.receive()
            now, t0 = wall(), cpu()
            step = in_flight.popleft()[0]
            if output.step_id != step.step_id:
                raise WorkerLost(f"worker {replica.name} answered step {output.step_id}, expected {step.step_id}")
            stats.loaded_s += now - loaded_since
            loaded_since = now
            stats.worker_busy_s += output.total_s
            stats.steps += 1
            outputs = scheduler.update(step, output)
            t1 = cpu()
            self._dispatch(outputs)
            stats.update_s += t1 - t0
            stats.dispatch_s += cpu() - t1
            if now >= next_log:
                next_log = now + LOAD_LOG_INTERVAL_S
                self._log_load(replica)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            tracked = self._requests.get(output.request_id)
            if tracked is None:
                continue  # aborted meanwhile
            if output.finished:
                del self._requests[output.request_id]
            if not tracked.answered:
                tracked.answered = True
                request = tracked.request
                if output.queue_s is None and request.first_scheduled_time is not None:
                    output.queue_s = request.first_scheduled_time - request.arrival_time
            tracked.outputs.put(output)

    def _on_worker_lost(self, replica: _Replica, reason: str) -> None:
        scheduler, replica.scheduler = replica.scheduler, None
        if scheduler is None:
            return
        requests = scheduler.take_all_requests()
        moved = failed = 0
        for request in requests:
            tracked = self._requests.get(request.request_id)
            if tracked is None:
                continue
            try:
                target = self._route(request, exclude=replica)
                target.scheduler.add_request(request)  # type: ignore[union-attr]
            except AdmissionError as exc:
                self._fail(tracked, f"worker {replica.name} was lost ({reason}) and the request could not move: {exc.message}")
                failed += 1
                continue
            tracked.replica = target
            target.wakeup.set()
            moved += 1
        log.warning("worker_requests_moved", worker=replica.name, reason=reason, moved=moved, failed=failed)

    def _log_load(self, replica: _Replica) -> None:
        stats = replica.stats
        elapsed = time.perf_counter() - stats.started
        log.info(
            "worker_load",
            worker=replica.name,
            steps=stats.steps,
            steps_per_s=round(stats.steps / elapsed, 1),
            worker_idle_fraction=round(stats.idle_fraction(), 4),
            gateway_ms_per_step=round(stats.gateway_s_per_step(replica.link.decode_s) * 1e3, 3),
        )

    # --- metrics --------------------------------------------------------------------------------

    def worker_metrics(self) -> list[WorkerMetrics]:
        metrics = []
        for replica in self.replicas:
            scheduler = replica.scheduler
            if scheduler is None:
                total = replica.registration.num_blocks if replica.registration else 0
                metrics.append(WorkerMetrics(replica.name, False, 0, 0, total, 0, total, 0, 0.0, 0, 0, 0, 0, 0, 0))
                continue
            metrics.append(_metrics_from_stats(replica.name, replica.ready, scheduler))
        return metrics


def _metrics_from_stats(name: str, ready: bool, scheduler: Scheduler) -> WorkerMetrics:
    stats = scheduler.stats()
    return WorkerMetrics(
        worker=name,
        ready=ready,
        requests_running=scheduler.num_running_requests,
        requests_waiting=scheduler.num_waiting,
        kv_blocks_total=stats.num_blocks,
        kv_blocks_used=stats.used_blocks,
        kv_blocks_free=stats.free_blocks,
        kv_blocks_cached=stats.cached_blocks,
        kv_utilization=stats.kv_utilization,
        prefix_cache_queries_tokens=stats.prefix_queries_tokens,
        prefix_cache_hits_tokens=stats.prefix_hits_tokens,
        preemptions=stats.preemptions,
        evictions=stats.evictions,
        swaps_out=stats.swaps_out,
        swaps_in=stats.swaps_in,
    )


def _has_work(step: StepInput) -> bool:
    return bool(step.scheduled or step.new_seqs or step.freed_seq_ids or step.swap_out or step.swap_in or step.copies)


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _stop_process(process: ChildProcess, timeout: float = 5.0) -> None:
    """Wait for a spawned worker to exit after Shutdown; terminate, then kill, a stuck one."""
    process.join(timeout)
    if process.exitcode is None:
        process.terminate()  # type: ignore[attr-defined]
        process.join(timeout)
    if process.exitcode is None:
        process.kill()  # type: ignore[attr-defined]
        process.join(timeout)
