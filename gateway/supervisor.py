"""The workers' lives as the gateway sees them: spawn (for `pagedd serve`), register, run each
one's step loop, and when one is lost, hand its requests on, kill a hung process, spawn a fresh
one and register it again with a fresh scheduler (a new session: the worker starts empty).

The supervisor owns the replicas and what every worker must agree on (model, block size, context
window), and the index of each host KV store its workers attached (gateway/kv_store_index.py: one
per store id, shared by the replicas whose workers attached that store); the engine front end (gateway/engine.py) owns the request streams and is told, through
the callbacks, of outputs and of lost workers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence

import zmq.asyncio

from paged.gateway.kv_store_index import KVStoreIndexes
from paged.gateway.outputs import RequestOutput
from paged.gateway.replica import Replica, WorkerSpec
from paged.gateway.replica_step_loop import run_step_loop
from paged.gateway.scheduler import Scheduler
from paged.gateway.scheduler_stats import SchedulerFigures
from paged.gateway.worker_link import ChildProcess, RegistrationError, WorkerLink, WorkerLost
from paged.shared.config import CacheConfig
from paged.shared.logging import get_logger
from paged.shared.protocol import WorkerRegistration

log = get_logger("gateway.supervisor")

REREGISTER_RETRY_S = 1.0


class Supervisor:
    def __init__(
        self,
        workers: Sequence[WorkerSpec],
        cache_config: CacheConfig,
        make_scheduler: Callable[[str, WorkerRegistration, int, SchedulerFigures | None], Scheduler],
        dispatch: Callable[[list[RequestOutput]], None],
        on_lost: Callable[[Replica, Scheduler, str], None],
        *,
        registration_timeout: float,
        steps_in_flight: int,
    ) -> None:
        self.cache_config = cache_config
        # (replica name, registration, max_model_len, the figures of its earlier sessions) -> a fresh scheduler
        self.make_scheduler = make_scheduler
        self.dispatch = dispatch
        self.on_lost = on_lost
        self.registration_timeout = registration_timeout
        self.steps_in_flight = steps_in_flight
        self.gateway_id = uuid.uuid4().hex[:12]
        self.context = zmq.asyncio.Context()
        self.replicas = [
            Replica(i, spec, WorkerLink(self.context, spec.endpoint, name=str(i), gateway_id=self.gateway_id, accept=self._accept))
            for i, spec in enumerate(workers)
        ]
        self.model = ""  # what the first worker registered with; every other must serve the same
        self.kv_stores = KVStoreIndexes(cache_config.kv_store_eviction_policy)
        self.max_model_len = 0  # the smallest context window of the first registrations
        self.replacing = True  # a lost worker is replaced by a fresh one, until shutdown begins

    async def start(self) -> None:
        """Spawn (where needed) and register every worker, then run their step loops; raises
        RegistrationError after the timeout."""
        for replica in self.replicas:
            self._spawn_if_needed(replica)
            if replica.link.process is not None:
                log.info("worker_spawned", progress=f"worker {replica.name}: process started, loading the model…", worker=replica.name)
            else:
                log.info("worker_awaited", progress=f"waiting for the worker at {replica.spec.endpoint} to register…", worker=replica.name)
        registrations = await asyncio.gather(*(r.link.register(self.registration_timeout) for r in self.replicas))
        self.max_model_len = min(registration.max_model_len for registration in registrations)
        for replica, registration in zip(self.replicas, registrations, strict=True):
            self.attach(replica, registration)
            replica.task = asyncio.create_task(self._supervise(replica), name=f"worker-{replica.name}")

    async def stop(self) -> None:
        """Stop the step loops, tell the workers to exit and wait for spawned processes."""
        self.stop_replacing()
        tasks = [r.task for r in self.replicas if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop_replacing(self) -> None:
        """Shutdown has begun: a worker lost from here on is not replaced. (A stop signal sent to the whole
        process group ends the workers with the gateway; a fresh worker would only load the model to be
        told to exit.)"""
        self.replacing = False

    async def close(self) -> None:
        await asyncio.gather(*(r.link.close() for r in self.replicas))
        for replica in self.replicas:
            process = replica.link.process
            if process is not None:
                await asyncio.to_thread(_stop_process, process)
        self.context.term()

    def kill_worker_processes(self) -> None:
        """SIGKILL the spawned workers now (a second stop signal: exit without draining). Their
        supervision stops first: nothing respawns them."""
        for replica in self.replicas:
            if replica.task is not None:
                replica.task.cancel()
        for replica in self.replicas:
            process = replica.link.process
            if process is not None and process.exitcode is None:
                process.kill()  # type: ignore[attr-defined]

    def _accept(self, registration: WorkerRegistration) -> str | None:
        """Refuse a worker that cannot join this gateway's replicas (None: accept)."""
        if registration.block_size != self.cache_config.block_size:
            return f"worker block_size {registration.block_size} differs from the gateway's {self.cache_config.block_size}"
        if self.model and registration.model != self.model:
            return f"worker serves model {registration.model!r}, the other workers {self.model!r}"
        if self.max_model_len and registration.max_model_len < self.max_model_len:
            return f"worker max_model_len {registration.max_model_len} is below the gateway's {self.max_model_len}"
        return self.kv_stores.conflict(registration.kv_store_id, registration.num_store_slots)

    def attach(self, replica: Replica, registration: WorkerRegistration) -> None:
        self.model = self.model or registration.model
        replica.attach(registration, self.make_scheduler(replica.name, registration, self.max_model_len, replica.figures))

    def _spawn_if_needed(self, replica: Replica) -> None:
        process = replica.link.process
        if replica.spec.spawn is not None and (process is None or process.exitcode is not None):
            replica.link.process = replica.spec.spawn()

    async def _supervise(self, replica: Replica) -> None:
        """Run the worker's step loop; when it is lost, hand its requests on and re-register it."""
        while True:
            try:
                await run_step_loop(replica, self.steps_in_flight, self.dispatch)
            except WorkerLost as lost:
                self._lost(replica, str(lost))
                process = replica.link.process
                if replica.spec.spawn is not None and process is not None and process.exitcode is None:
                    process.kill()  # type: ignore[attr-defined]  # hung: a fresh process replaces it
                    await asyncio.to_thread(process.join, 5)
            except Exception as exc:  # a gateway bug must not silently strand this worker's requests
                log.exception("step_loop_failed", worker=replica.name)
                self._lost(replica, f"gateway error in the step loop: {exc!r}")
            if not self.replacing:
                return
            while True:
                self._spawn_if_needed(replica)
                try:
                    registration = await replica.link.register(timeout=self.registration_timeout)
                    break
                except RegistrationError as exc:
                    log.warning("worker_reregistration_failed", worker=replica.name, error=str(exc))
                    await asyncio.sleep(REREGISTER_RETRY_S)
            self.attach(replica, registration)
            log.info("worker_rejoined", worker=replica.name)

    def _lost(self, replica: Replica, reason: str) -> None:
        scheduler = replica.detach()
        if scheduler is not None:
            self.on_lost(replica, scheduler, reason)


def _stop_process(process: ChildProcess, timeout: float = 5.0) -> None:
    """Wait for a spawned worker to exit after Shutdown; terminate, then kill, a stuck one."""
    process.join(timeout)
    if process.exitcode is None:
        process.terminate()  # type: ignore[attr-defined]
        process.join(timeout)
    if process.exitcode is None:
        process.kill()  # type: ignore[attr-defined]
        process.join(timeout)
