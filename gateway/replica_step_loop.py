"""The server's step loop for one replica: the step pipeline (gateway/step_pipeline.py) driven over
the replica's WorkerLink in the event loop. It keeps `depth` steps in flight, sleeps while the
scheduler has nothing to do, and hands each step's outputs to `dispatch` (the request streams).
It returns only by raising: WorkerLost when the worker goes away (or answers out of order). A step
that cannot be encoded fails only the requests at fault (gateway/unencodable_items.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from paged.gateway.outputs import RequestOutput
from paged.gateway.replica import Replica
from paged.gateway.step_pipeline import StepOrderError, StepPipeline, is_empty
from paged.gateway.unencodable_items import fail_unencodable
from paged.gateway.worker_link import WorkerLost
from paged.shared.logging import get_logger
from paged.shared.protocol import UnencodableMessage

log = get_logger("gateway.step_loop")

LOAD_LOG_INTERVAL_S = 10.0


async def run_step_loop(replica: Replica, depth: int, dispatch: Callable[[list[RequestOutput]], None]) -> None:
    scheduler, link = replica.scheduler, replica.link
    assert scheduler is not None
    pipeline = StepPipeline(scheduler, depth)
    # Gateway phases are timed in thread CPU time (what the gateway spends, whatever else the
    # host runs); the worker's load in wall time.
    cpu, wall = time.thread_time, time.perf_counter
    loaded_since = 0.0
    next_log = wall() + LOAD_LOG_INTERVAL_S
    while True:
        replica.wakeup.clear()
        stats = replica.step_stats  # replaceable from outside, to measure a window
        while pipeline.wants_step():
            t0 = cpu()
            step = pipeline.schedule()
            t1 = cpu()
            stats.schedule_s += t1 - t0
            if is_empty(step):
                break
            if pipeline.num_in_flight == 1:  # the worker had nothing: it is loaded from now
                loaded_since = wall()
            try:
                await link.send_step(step)
            except UnencodableMessage as error:
                dispatch(fail_unencodable(scheduler, step, error, replica.name))
                await link.send_step(step)
            stats.send_s += cpu() - t1
        dispatch(pipeline.answer_unsent())
        if not pipeline.num_in_flight:
            await _wait_any(replica.wakeup, link.lost)
            if link.lost.is_set():
                raise WorkerLost(link.lost_reason or "worker lost")
            continue
        output = await link.receive()
        now, t0 = wall(), cpu()
        stats.loaded_s += now - loaded_since
        loaded_since = now
        stats.worker_busy_s += output.total_s
        stats.worker_forward_s += output.forward_s
        stats.steps += 1
        try:
            outputs = pipeline.complete(output)
        except StepOrderError as exc:
            raise WorkerLost(f"worker {replica.name}: {exc}") from None
        t1 = cpu()
        dispatch(outputs)
        stats.update_s += t1 - t0
        stats.dispatch_s += cpu() - t1
        if now >= next_log:
            next_log = now + LOAD_LOG_INTERVAL_S
            _log_load(replica)


def _log_load(replica: Replica) -> None:
    stats = replica.step_stats
    elapsed = time.perf_counter() - stats.started
    log.info(
        "worker_load",
        worker=replica.name,
        steps=stats.steps,
        steps_per_s=round(stats.steps / elapsed, 1),
        worker_idle_fraction=round(stats.idle_fraction(), 4),
        gateway_ms_per_step=round(stats.gateway_s_per_step(replica.link.decode_s) * 1e3, 3),
        worker_forward_ms_per_step=round(stats.worker_forward_s / max(stats.steps, 1) * 1e3, 3),
    )


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
