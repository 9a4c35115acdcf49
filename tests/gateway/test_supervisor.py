"""The supervisor's handling of a lost worker, without processes: its requests move to the other
replica, and the scheduler made when it registers again carries on what the lost one counted and
learned (SchedulerFigures: counters, evictions, output lengths, admission margin, thrash window)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from paged.gateway.engine import AsyncEngine
from paged.gateway.replica import WorkerSpec
from paged.gateway.request import Request
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.protocol import WorkerRegistration
from paged.shared.sampling_params import SamplingParams

BS = 4
NUM_BLOCKS = 32


def registration(worker_id: str) -> WorkerRegistration:
    return WorkerRegistration(1, worker_id, NUM_BLOCKS, 0, BS, 256, "test-model", "cpu", "float32", 1)


@pytest.fixture
def engine() -> Iterator[AsyncEngine]:
    engine = AsyncEngine(
        [WorkerSpec("ipc:///nonexistent-0"), WorkerSpec("ipc:///nonexistent-1")],
        SchedulerConfig(kv_watermark=0.0),
        CacheConfig(block_size=BS),
    )
    engine.supervisor.max_model_len = 256
    for index, replica in enumerate(engine.replicas):
        engine.supervisor.attach(replica, registration(f"w{index}"))
    yield engine
    engine.supervisor.context.term()


def test_a_reregistered_worker_keeps_counting_where_its_lost_session_stopped(engine: AsyncEngine) -> None:
    lost = engine.replicas[0]
    scheduler = lost.scheduler
    assert scheduler is not None
    scheduler.add_request(Request("done", list(range(1, 10)), SamplingParams(max_tokens=3, ignore_eos=True)))
    StepLoop(scheduler, SimulatedWorker(NUM_BLOCKS, BS), overlapped=False).run()
    before = lost.stats()
    assert before.computed_tokens > 0 and scheduler.figures.lengths.num_samples == 1

    engine.supervisor._lost(lost, "test: the worker went away")
    engine.supervisor.attach(lost, registration("w0-again"))

    assert lost.scheduler is not None and lost.scheduler is not scheduler
    after = lost.stats()
    assert after.computed_tokens == before.computed_tokens and after.prefix_queries_tokens == before.prefix_queries_tokens
    assert lost.scheduler.figures.lengths.num_samples == 1  # the output lengths learned so far
    assert engine.replicas[1].stats().computed_tokens == 0  # the other replica's figures are its own
