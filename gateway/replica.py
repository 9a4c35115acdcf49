"""One worker as the engine holds it: its link, its scheduler while registered, the event that
wakes its step loop, and its step-loop statistics. The engine runs one Replica per worker
(data-parallel replicas, each with its own page pool); the router picks among them, and the KV
hand-off (gateway/handoff.py) moves requests from prefill to decode replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from paged.gateway.scheduler import Scheduler
from paged.gateway.scheduler_stats import SchedulerFigures
from paged.gateway.stats import WorkerStats, extend
from paged.gateway.worker_link import ChildProcess, WorkerLink
from paged.shared.config import WorkerRole
from paged.shared.protocol import WorkerRegistration


@dataclass(slots=True)
class WorkerSpec:
    """Where a worker listens, and for `pagedd serve` how to (re)start its process."""

    endpoint: str
    spawn: Callable[[], ChildProcess] | None = None
    role: WorkerRole | None = None  # the gateway's layout (--workers-layout); None: the role the worker registers with


@dataclass(slots=True)
class StepLoopStats:
    """Gateway CPU time per step by phase, and the worker's idle fraction while it had work queued."""

    steps: int = 0
    schedule_s: float = 0.0
    send_s: float = 0.0  # encode + send
    update_s: float = 0.0  # scheduler.update
    dispatch_s: float = 0.0  # hand-off of the outputs to the request streams
    worker_busy_s: float = 0.0  # the worker's own total_s per step
    worker_forward_s: float = 0.0  # of which in the model forward and sampling
    loaded_s: float = 0.0  # wall time with at least one step in flight
    started: float = field(default_factory=time.perf_counter)

    def gateway_s_per_step(self, decode_s: float = 0.0) -> float:
        return (self.schedule_s + self.send_s + self.update_s + self.dispatch_s + decode_s) / max(self.steps, 1)

    def idle_fraction(self) -> float:
        return 0.0 if self.loaded_s <= 0 else max(0.0, 1.0 - self.worker_busy_s / self.loaded_s)


class Replica:
    def __init__(self, index: int, spec: WorkerSpec, link: WorkerLink) -> None:
        self.name = str(index)
        self.spec = spec
        self.link = link
        self.scheduler: Scheduler | None = None  # while registered
        # What its schedulers count and learn, carried from one worker session to the next.
        self.figures: SchedulerFigures | None = None
        self.registration: WorkerRegistration | None = None
        self.wakeup = asyncio.Event()  # set when its scheduler has news for the step loop
        self.step_stats = StepLoopStats()
        self.task: asyncio.Task[None] | None = None  # its step loop and supervision

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and self.link.connected

    @property
    def role(self) -> WorkerRole:
        if self.spec.role is not None:
            return self.spec.role
        return self.registration.role if self.registration is not None else "mixed"

    @property
    def transfer_endpoint(self) -> str:
        return self.registration.transfer_endpoint if self.registration is not None else ""

    @property
    def page_bytes(self) -> int:
        return self.registration.page_bytes if self.registration is not None else 0

    def wake(self) -> None:
        self.wakeup.set()

    @property
    def load(self) -> int:
        """Running sequences plus waiting requests: what the router balances."""
        assert self.scheduler is not None
        return self.scheduler.num_running + self.scheduler.num_waiting

    def attach(self, registration: WorkerRegistration, scheduler: Scheduler) -> None:
        """A (re)registered worker: a fresh scheduler over its empty pool."""
        self.registration = registration
        self.scheduler = scheduler
        self.figures = scheduler.figures
        self.step_stats = StepLoopStats()
        self.wakeup.set()

    def detach(self) -> Scheduler | None:
        """The worker is lost: its scheduler leaves with it (returned, to take its requests back)."""
        scheduler, self.scheduler = self.scheduler, None
        return scheduler

    def stats(self) -> WorkerStats:
        """The worker's snapshot: its scheduler's figures, or zeros while it registers."""
        scheduler = self.scheduler
        if scheduler is None:
            registration = self.registration
            return WorkerStats(
                name=self.name,
                state="registering",
                endpoint=self.spec.endpoint,
                role=self.role,
                steps=self.step_stats.steps,
                num_blocks=registration.num_blocks if registration else 0,
                block_size=registration.block_size if registration else 0,
                free_blocks=registration.num_blocks if registration else 0,
            )
        return extend(
            scheduler.stats(),
            WorkerStats,
            name=self.name,
            state="ready" if self.ready else "disconnected",
            endpoint=self.spec.endpoint,
            role=self.role,
            steps=self.step_stats.steps,
        )
