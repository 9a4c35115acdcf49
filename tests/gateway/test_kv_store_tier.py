"""The host KV store tier through the scheduler: evicted cached blocks are saved, prefix hits only the
store has are loaded back, replicas share one store, and a lost worker's saves are quarantined.

The simulated worker checks every position a sequence reads against the token it must hold, so a
load of a slot that was never (or not yet) written, or was overwritten, fails the test; every step
ends with the block accounting audit, which covers the store index (slots, pins, policy)."""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.kv_store_index import KVStoreIndex
from paged.gateway.scheduler import Scheduler
from paged.gateway.step_builder import is_empty
from paged.gateway.step_pipeline import StepPipeline
from paged.ops.sim_worker import ProtocolViolation, SimulatedWorker
from paged.shared.protocol import SeqError, StepInput, StepOutput
from support.scheduler_steps import BS, ORDERS, host_store, loop_for, make, req, run

SYSTEM_PROMPTS = [[100 + p * 10 + i for i in range(3 * BS)] for p in range(6)]  # three blocks each


def prompt(system: int, tail: int) -> list[int]:
    return SYSTEM_PROMPTS[system] + [7, 8, tail]


def serve_one_by_one(scheduler: Scheduler, loop: object, prompts: list[list[int]], name: str, max_tokens: int = 3) -> None:
    for number, token_ids in enumerate(prompts):
        scheduler.add_request(req(f"{name}-{number}", token_ids, max_tokens=max_tokens, ignore_eos=True))
        run(loop)  # type: ignore[arg-type]


@ORDERS
def test_evicted_prefixes_are_loaded_back_instead_of_recomputed(overlapped: bool) -> None:
    index, arena = host_store(64)
    with_store = make(16, store_index=index)
    without = make(16)
    prompts = [prompt(system, tail) for tail in (1, 2) for system in range(6)]  # 6 × 4 blocks > 16
    serve_one_by_one(with_store, loop_for(with_store, overlapped, store=arena), prompts, "a")
    serve_one_by_one(without, loop_for(without, overlapped), prompts, "b")
    stored, plain = with_store.stats(), without.stats()
    assert index.stats().saves > 0 and index.stats().loads > 0
    assert stored.store_hits_tokens > 0 and plain.store_hits_tokens == 0
    # Every system prompt's second request finds all three blocks in one tier or the other.
    assert stored.prefix_hits_tokens == 6 * 3 * BS
    assert plain.prefix_hits_tokens < stored.prefix_hits_tokens
    assert stored.store_misses_tokens == 6 * 3 * BS  # the first round's, computed from scratch
    assert index.stats().pinned_slots == 0 and index.stats().saving_slots == 0


@ORDERS
def test_replicas_share_the_store(overlapped: bool) -> None:
    index, arena = host_store(64)
    first = make(16, store_index=index, worker_name="a")
    second = make(16, store_index=index, worker_name="b")
    serve_one_by_one(first, loop_for(first, overlapped, store=arena), [prompt(s, 1) for s in range(6)], "a")
    # The first system prompts left the first worker's pool for the store: the second worker loads them.
    serve_one_by_one(second, loop_for(second, overlapped, store=arena), [prompt(s, 2) for s in range(2)], "b")
    assert second.stats().store_hits_tokens == 2 * 3 * BS
    assert_block_accounting(first)


class DeferredLoop:
    """A worker that runs each step as late as it may: just before the gateway applies its output.
    With another replica stepping in between, this is when an unconfirmed save would show."""

    def __init__(self, scheduler: Scheduler, worker: SimulatedWorker, depth: int = 2) -> None:
        self.scheduler = scheduler
        self.worker = worker
        self.pipeline = StepPipeline(scheduler, depth)
        self.sent: deque[StepInput] = deque()
        self.before_execute: list[StepInput] = []  # a lost predecessor's steps, run before this worker's first

    def busy(self) -> bool:
        return self.scheduler.needs_step() or bool(self.pipeline.num_in_flight)

    def step(self) -> None:
        if self.scheduler.needs_step():
            step = self.pipeline.schedule()
            if not is_empty(step):
                self.sent.append(step)
            if self.pipeline.num_in_flight < self.pipeline.depth:
                return
        self.apply_oldest()

    def apply_oldest(self) -> None:
        if self.pipeline.awaiting_output:
            self.pipeline.complete(self.execute(self.sent.popleft()))
        else:
            self.pipeline.answer_unsent()

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute(step)


def test_a_save_is_not_loadable_before_its_step_comes_back() -> None:
    index, arena = host_store(64)
    first = make(5, store_index=index, worker_name="a")
    second = make(16, store_index=index, worker_name="b")
    a = DeferredLoop(first, SimulatedWorker(5, BS, store=arena))
    b = DeferredLoop(second, SimulatedWorker(16, BS, store=arena))
    first.add_request(req("a-0", prompt(0, 1), max_tokens=2, ignore_eos=True))
    while a.busy():
        a.step()
    # A prompt of five blocks: its admission evicts system prompt 0 and its tail block, all saved.
    first.add_request(req("a-1", SYSTEM_PROMPTS[1] + list(range(7, 14)), max_tokens=1, ignore_eos=True))
    saves_before = index.stats().saves
    a.step()  # the step that saves them: sent, not run yet
    assert index.stats().saving_slots == 4 and index.stats().saves == saves_before  # ordered, not done
    second.add_request(req("b-0", prompt(0, 2), max_tokens=2, ignore_eos=True))
    while b.busy():
        b.step()  # were the saving slots loadable, b's worker would read blocks never written
    assert second.stats().store_hits_tokens == 0
    while a.busy():
        a.step()
    assert index.stats().saving_slots == 0 and index.stats().ready_slots == 4
    assert index.stats().saves == saves_before + 4
    third = make(16, store_index=index, worker_name="c")
    c = DeferredLoop(third, SimulatedWorker(16, BS, store=arena))
    third.add_request(req("c-0", prompt(0, 3), max_tokens=2, ignore_eos=True))
    while c.busy():
        c.step()
    assert third.stats().store_hits_tokens == 3 * BS
    for scheduler in (first, second, third):
        assert_block_accounting(scheduler)


def test_a_lost_workers_saves_are_quarantined_until_its_next_session_answers() -> None:
    index, arena = host_store(6)
    first = make(5, store_index=index, worker_name="a")
    a = DeferredLoop(first, SimulatedWorker(5, BS, store=arena))
    first.add_request(req("a-0", prompt(0, 1), max_tokens=2, ignore_eos=True))
    while a.busy():
        a.step()
    first.add_request(req("a-1", SYSTEM_PROMPTS[1] + list(range(7, 14)), max_tokens=1, ignore_eos=True))
    a.step()  # saves four blocks; the worker is lost before it answers
    unanswered = list(a.sent)
    requests = first.take_all_requests()
    stats = index.stats()
    assert (stats.quarantined_slots, stats.saving_slots, stats.free_slots) == (4, 0, 2)
    assert stats.failed_saves == 4  # they may still run, but nothing will ever confirm them
    # The worker comes back: its old steps run first (here: now), then its new session's first output
    # frees the quarantine.
    again = make(5, store_index=index, worker_name="a")
    fresh = DeferredLoop(again, SimulatedWorker(5, BS, store=arena))
    for old in unanswered:
        a.worker.execute(old)
    for request in requests:
        again.add_request(request)
    fresh.step()
    fresh.apply_oldest()
    assert index.stats().quarantined_slots == 0
    while fresh.busy():
        fresh.step()
    assert_block_accounting(again)


def prompt_0_in_the_store(num_blocks: int) -> tuple[KVStoreIndex, Scheduler]:
    """A pool of `num_blocks` whose store holds prompt 0's system prompt: served, then evicted by
    serving prompt 1."""
    index, arena = host_store(64)
    scheduler = make(num_blocks, store_index=index)
    loop = loop_for(scheduler, overlapped=False, store=arena)
    serve_one_by_one(scheduler, loop, [prompt(0, 1), SYSTEM_PROMPTS[1] + list(range(7, 14))], "a", 1)
    return index, scheduler


def test_a_failed_step_drops_its_saves_and_the_blocks_it_loaded() -> None:
    index, scheduler = prompt_0_in_the_store(5)
    before = index.stats()
    scheduler.add_request(req("c", prompt(0, 2), max_tokens=2, ignore_eos=True))
    step = scheduler.schedule()
    assert step.store_loads and step.store_saves  # loads prompt 0, saves prompt 1 on the way
    failed = StepOutput(step.step_id, page_moves_failed=True)
    scheduler.update(step, failed)
    stats = index.stats()
    assert stats.pinned_slots == 0 and stats.saving_slots == 0
    # The counters say what ran: none of this step's copies did.
    assert (stats.saves, stats.loads) == (before.saves, before.loads)
    assert (stats.failed_saves, stats.failed_loads) == (len(step.store_saves), len(step.store_loads))
    loaded = [copy.dst for copy in step.store_loads]
    assert all(scheduler.kv.pool.block_hashes[block] is None for block in loaded)  # type: ignore[attr-defined]
    assert_block_accounting(scheduler)


def test_a_failed_load_fails_the_requests_that_hit_its_blocks_in_the_next_step() -> None:
    """Overlapped: the step after the one that loads is built before the load's output is back, and a
    request admitted there hits the loaded blocks in the pool. When the load fails, those blocks
    never held the prefix: that request fails too instead of decoding from garbage, and nothing it
    computed over them joins the prefix cache."""
    _, scheduler = prompt_0_in_the_store(6)
    scheduler.add_request(req("c", prompt(0, 2), max_tokens=4, ignore_eos=True))
    loading = scheduler.schedule()
    loaded = {copy.dst for copy in loading.store_loads}
    assert loaded
    scheduler.add_request(req("d", prompt(0, 3), max_tokens=4, ignore_eos=True))
    scheduler.schedule()  # step N+1: "d" is admitted over the blocks "c" loads
    d = scheduler.requests["d"].seqs[0]
    assert loaded <= set(scheduler.kv.block_table(d.seq_id))
    errors = [SeqError(item.seq_id, "block copy/swap failed: injected") for item in loading.scheduled]
    outputs = scheduler.update(loading, StepOutput(loading.step_id, errors=errors, page_moves_failed=True))
    assert {output.request_id: output.finished and output.error is not None for output in outputs} == {"c": True, "d": True}
    assert "c" not in scheduler.requests and "d" not in scheduler.requests
    assert not scheduler.kv.holds(d)
    assert_block_accounting(scheduler)


# --- Random traffic over two replicas sharing a store ----------------------------------------------


@dataclass
class Replica:
    name: str
    num_blocks: int
    index: KVStoreIndex
    arena: list[list[int | None]]
    pool_policy: str
    scheduler: Scheduler = field(init=False)
    loop: DeferredLoop = field(init=False)

    def __post_init__(self) -> None:
        self.start()

    def start(self, predecessor: DeferredLoop | None = None) -> None:
        self.scheduler = make(self.num_blocks, store_index=self.index, worker_name=self.name, eviction_policy=self.pool_policy)
        self.loop = DeferredLoop(self.scheduler, SimulatedWorker(self.num_blocks, BS, store=self.arena))
        if predecessor is not None:  # the lost worker still runs what it was sent, before answering anew
            old_steps = list(predecessor.sent)
            original = self.loop.execute

            def execute(step: StepInput) -> StepOutput:
                while old_steps:
                    # What it reads may have changed meanwhile (its loads' slots were let go): its
                    # results are dropped anyway. What it writes to the store must hurt nobody.
                    with contextlib.suppress(ProtocolViolation):
                        predecessor.worker.execute(old_steps.pop(0))
                return original(step)

            self.loop.execute = execute  # type: ignore[method-assign]

    def lose(self) -> None:
        requests = self.scheduler.take_all_requests()
        predecessor = self.loop
        self.start(predecessor)
        for request in requests:
            self.scheduler.add_request(request)


# (replica, system prompt, what): 9 loses the replica's worker, anything else sends it a request.
ACTIONS = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5), st.integers(0, 9)), min_size=10, max_size=60)


@settings(max_examples=60, deadline=None)
@given(
    actions=ACTIONS,
    num_slots=st.integers(3, 40),
    pool_blocks=st.tuples(st.integers(5, 12), st.integers(5, 12)),
    pool_policy=st.sampled_from(["lru", "lfu", "depth"]),
    store_policy=st.sampled_from(["lru", "lfu", "depth"]),
)
def test_random_traffic_over_two_replicas_sharing_a_store(
    actions: list[tuple[int, int, int]],
    num_slots: int,
    pool_blocks: tuple[int, int],
    pool_policy: str,
    store_policy: str,
) -> None:
    index, arena = host_store(num_slots, store_policy)
    replicas = [Replica(name, blocks, index, arena, pool_policy) for name, blocks in zip("ab", pool_blocks, strict=True)]
    for number, (which, system, what) in enumerate(actions):
        replica = replicas[which]
        if what == 9:
            replica.lose()
        else:
            replica.scheduler.add_request(req(f"r{number}", prompt(system, what), max_tokens=1 + what % 3, ignore_eos=True))
        for _ in range(1 + what % 3):
            if replica.loop.busy():
                replica.loop.step()
        for each in replicas:
            assert_block_accounting(each.scheduler)
    for replica in replicas:
        while replica.loop.busy():
            replica.loop.step()
        assert_block_accounting(replica.scheduler)
        assert replica.scheduler.stats().used_blocks == 0
    stats = index.stats()
    assert stats.pinned_slots == 0 and stats.saving_slots == 0
