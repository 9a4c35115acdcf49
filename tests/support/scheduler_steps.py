"""Helpers of the scheduler tests: a Scheduler on a small pool, requests, and the step pipeline
against a verifying simulated worker, in both call orders: simple (schedule, update, schedule,
...) and overlapped (schedule N+1 before update N)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.kv_store_index import KVStoreIndex, KVStoreIndexes
from paged.gateway.outputs import RequestOutput
from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.sampling_params import SamplingParams

BS = 4
EOS = 0
ORDERS = pytest.mark.parametrize("overlapped", [False, True], ids=["simple", "overlapped"])


def make(
    num_blocks: int = 64,
    *,
    max_model_len: int = 256,
    host_blocks: int = 0,
    prefix_caching: bool = True,
    allocator: str = "paged",
    eviction_policy: str = "lru",
    store_index: KVStoreIndex | None = None,
    worker_name: str = "0",
    **config: object,
) -> Scheduler:
    config.setdefault("kv_watermark", 0.0)
    # These tests drive preemption, swapping and recompute on purpose: they need a pool that
    # admission over-commits. Predictive admission has its own tests (test_admission_predictive.py).
    config.setdefault("admission_policy", "greedy")
    cache_config = CacheConfig(
        block_size=BS, enable_prefix_caching=prefix_caching, kv_allocator=allocator, kv_eviction_policy=eviction_policy
    )
    return Scheduler(
        SchedulerConfig(**config),
        cache_config,
        num_blocks,
        max_model_len,
        num_host_blocks=host_blocks,
        store_index=store_index,
        worker_name=worker_name,
        context_cost=0.1,
    )


def req(request_id: str, prompt: list[int], priority: int = 0, salt: str | None = None, **params: object) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(
        request_id, prompt, SamplingParams(**params), eos_token_ids=frozenset({EOS}), priority=priority, cache_salt=salt
    )


def loop_for(
    scheduler: Scheduler,
    overlapped: bool,
    choose_token: Callable[[int, int], int] | None = None,
    store: list[list[int | None]] | None = None,
) -> StepLoop:
    """`store`: the simulated KV store arena (one list of slots per host, shared by its workers)."""
    kv = scheduler.kv
    worker = SimulatedWorker(
        kv.num_blocks,
        BS,
        kv.num_host_blocks,
        choose_token=choose_token or (lambda seq_id, position: 1 + (seq_id * 7 + position) % 50),
        store=store,
    )
    return StepLoop(scheduler, worker, overlapped=overlapped)


def run(loop: StepLoop, max_steps: int = 2000) -> int:
    steps = loop.run(max_steps, after_step=lambda _: assert_block_accounting(loop.scheduler))
    assert_block_accounting(loop.scheduler)
    stats = loop.scheduler.stats()
    assert stats.used_blocks == 0 and stats.running_seqs == 0 and stats.waiting_requests == 0
    return steps


def texts(outputs: list[RequestOutput]) -> dict[str, dict[int, list[int]]]:
    result: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for output in outputs:
        for delta in output.deltas:
            result[output.request_id][delta.index] += delta.token_ids
    return result


def finishes(outputs: list[RequestOutput]) -> dict[tuple[str, int], str]:
    return {
        (output.request_id, delta.index): delta.finish_reason
        for output in outputs
        for delta in output.deltas
        if delta.finish_reason
    }


def host_store(num_slots: int, policy: str = "lru") -> tuple[KVStoreIndex, list[list[int | None]]]:
    """A host KV store: the gateway's index of it and the simulated arena its workers share."""
    index = KVStoreIndexes(policy).for_store("host-store", num_slots, page_bytes=1024, context_cost=0.1)  # type: ignore[arg-type]
    assert index is not None
    return index, [[None] * BS for _ in range(num_slots)]
