"""The step loop, written once: schedule → send → receive → update, with up to `depth` steps in
flight and every step's results applied in step order.

With depth 2 (the server's default) step N+1 is scheduled and sent while the worker runs step N,
so one step always waits in the worker's queue (overlapped scheduling: the scheduler's
placeholders let step N+1 decode the token step N samples). With depth 1 each step is applied
before the next is scheduled.

A step with nothing for the worker (no tokens to compute, nothing to free, swap, copy or transfer)
is never sent: it stays in flight unsent and is answered with an empty output when its turn comes,
so update() always follows step order. A step that only polls for KV transfers
(gateway/transfer_items.py) is sent only when no other step is in flight: that one's output brings
the transfer reports anyway.

`StepPipeline` knows no transport and no event loop. The server's step loop
(gateway/replica_step_loop.py) drives it over ZeroMQ with asyncio; `LocalStepLoop` below drives it
against a worker in this process: the offline engine (ops/offline_engine.py), the simulator
(ops/sim_worker.py, ops/simulate.py) and the tests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from paged.gateway.outputs import RequestOutput
from paged.gateway.scheduler import Scheduler
from paged.gateway.step_builder import is_empty
from paged.shared.protocol import StepInput, StepOutput

DEFAULT_DEPTH = 2  # the step the worker runs and the one waiting behind it

__all__ = ["DEFAULT_DEPTH", "LocalStepLoop", "StepOrderError", "StepPipeline", "is_empty"]


class StepOrderError(RuntimeError):
    """A worker answered another step than the oldest one sent: its session cannot be trusted."""


class StepPipeline:
    def __init__(self, scheduler: Scheduler, depth: int = DEFAULT_DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"a pipeline keeps at least one step in flight, not {depth}")
        self.scheduler = scheduler
        self.depth = depth
        self._in_flight: deque[tuple[StepInput, bool]] = deque()  # (step, sent), oldest first

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def awaiting_output(self) -> bool:
        """The oldest step in flight was sent: its output comes from the worker next."""
        return bool(self._in_flight) and self._in_flight[0][1]

    def wants_step(self) -> bool:
        """Room for another step, and a reason to schedule one: unfinished requests, or frees to
        send while nothing is in flight."""
        if len(self._in_flight) >= self.depth:
            return False
        return self.scheduler.has_unfinished_requests() or (not self._in_flight and self.scheduler.needs_step())

    def schedule(self) -> StepInput:
        """Schedule the next step and put it in flight. The caller sends it to the worker unless
        it is empty (`is_empty`): an empty step is answered in its turn by answer_unsent()."""
        step = self.scheduler.schedule()
        if step.transfer_wait_s and self._in_flight:
            step.transfer_wait_s = 0.0
        self._in_flight.append((step, not is_empty(step)))
        return step

    def answer_unsent(self) -> list[RequestOutput]:
        """Apply the unsent (empty) steps at the head of the pipeline: every earlier step is done."""
        outputs: list[RequestOutput] = []
        while self._in_flight and not self._in_flight[0][1]:
            step = self._in_flight.popleft()[0]
            outputs += self.scheduler.update(step, StepOutput(step_id=step.step_id))
        return outputs

    def complete(self, output: StepOutput) -> list[RequestOutput]:
        """Apply the worker's output for the oldest sent step, then answer the unsent steps behind it."""
        outputs = self.answer_unsent()
        if not self._in_flight:
            raise StepOrderError(f"output for step {output.step_id} with no step in flight")
        step = self._in_flight[0][0]
        if output.step_id != step.step_id:
            raise StepOrderError(f"answer for step {output.step_id}, expected step {step.step_id}")
        self._in_flight.popleft()
        outputs += self.scheduler.update(step, output)
        return outputs + self.answer_unsent()


class LocalStepLoop:
    """A pipeline against a worker in this process: `execute` runs a step at once, and its output
    waits for its turn like a remote worker's. `step()` schedules exactly one step, so a caller
    (a test) sees every step; `outputs` collects what was applied, in order (callers that stream
    them may clear it)."""

    def __init__(self, scheduler: Scheduler, execute: Callable[[StepInput], StepOutput], *, depth: int = 1) -> None:
        self.scheduler = scheduler
        self.execute = execute
        self.pipeline = StepPipeline(scheduler, depth)
        self.outputs: list[RequestOutput] = []
        self.num_steps = 0
        self._results: deque[StepOutput] = deque()  # outputs of sent steps, not yet applied

    def step(self) -> StepInput:
        """Schedule and execute one step; apply the oldest ones until the pipeline has room. Returns
        the step just scheduled (empty ones included)."""
        pipeline = self.pipeline
        step = pipeline.schedule()
        if not is_empty(step):
            self._results.append(self.execute(step))
        self.num_steps += 1
        while pipeline.num_in_flight >= pipeline.depth:
            self._apply_oldest()
        return step

    def _apply_oldest(self) -> None:
        if self.pipeline.awaiting_output:
            self.outputs += self.pipeline.complete(self._results.popleft())
        else:
            self.outputs += self.pipeline.answer_unsent()

    def drain(self) -> None:
        """Apply every step still in flight."""
        while self.pipeline.num_in_flight:
            self._apply_oldest()

    def run(self, max_steps: int = 100_000, after_step: Callable[[StepInput], None] | None = None) -> int:
        """Step until nothing is left; returns the number of steps."""
        scheduler = self.scheduler
        while scheduler.needs_step() or self.pipeline.num_in_flight:
            if not scheduler.needs_step():
                self.drain()
                continue
            step = self.step()
            if after_step is not None:
                after_step(step)
            if self.num_steps > max_steps:
                raise RuntimeError(f"no progress after {max_steps} steps")
        return self.num_steps
