"""The memory map, cache summary and request views (gateway/memory_map.py) on a Scheduler driven
in-process against the simulated worker: what they report must be exactly the block tables."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.engine_client import AdmissionError
from paged.gateway.memory_map import MemoryMap, cache_summary, hottest_prefixes, memory_map, request_info
from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.sampling_params import SamplingParams

BS = 4


def make(num_blocks: int = 32, prefix_caching: bool = True, allocator: str = "paged") -> Scheduler:
    # Greedy admission: the layouts below pack the pool with requests admitted at once.
    return Scheduler(
        SchedulerConfig(kv_watermark=0.0, admission_policy="greedy"),
        CacheConfig(block_size=BS, enable_prefix_caching=prefix_caching, kv_allocator=allocator),
        num_blocks,
        max_model_len=256,
    )


def req(request_id: str, prompt: list[int], max_tokens: int = 8, n: int = 1) -> Request:
    # Tokens 1..50 only, so the simulated worker never samples the eos (0).
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, n=n), eos_token_ids=frozenset({0}))


def loop_for(scheduler: Scheduler) -> StepLoop:
    worker = SimulatedWorker(scheduler.kv.num_blocks, BS, choose_token=lambda seq_id, pos: 1 + (seq_id + pos) % 50)
    return StepLoop(scheduler, worker, overlapped=False)


def held(memory: MemoryMap) -> dict[int, list[str]]:
    return {block.id: sorted(block.holders) for block in memory.blocks if block.state == "held"}


def tables(scheduler: Scheduler) -> dict[int, list[str]]:
    """Block id -> sorted request ids of the tables holding it, from the scheduler itself."""
    owner = {seq.seq_id: r.request_id for r in scheduler.requests.values() for seq in r.seqs}
    result: dict[int, list[str]] = {}
    for seq_id, record in scheduler.kv.seqs.items():
        for block in record.table:
            result.setdefault(block, []).append(owner[seq_id])
    return {block: sorted(holders) for block, holders in result.items()}


def check_consistent(scheduler: Scheduler, memory: MemoryMap) -> None:
    stats = scheduler.stats()
    figures = memory.figures
    assert held(memory) == tables(scheduler)
    assert [block.id for block in memory.blocks] == list(range(stats.num_blocks))
    for block in memory.blocks:
        assert block.ref == len(block.holders)
    counts = {state: sum(1 for b in memory.blocks if b.state == state) for state in ("free", "cached", "held")}
    assert counts == {"free": stats.free_blocks, "cached": stats.cached_blocks, "held": stats.used_blocks}
    assert (figures.free, figures.cached, figures.held, figures.shared) == (
        stats.free_blocks, stats.cached_blocks, stats.used_blocks, stats.shared_blocks,
    )  # fmt: skip
    assert sum(block.fill for block in memory.blocks) == figures.slots_filled == stats.slots_filled


def test_blocks_held_by_a_request_carry_its_id_and_fill() -> None:
    scheduler = make()
    loop = loop_for(scheduler)
    scheduler.add_request(req("a", list(range(1, 11))))  # 10 tokens: 3 blocks, the last half full
    loop.step()
    memory = memory_map(scheduler, "0")
    check_consistent(scheduler, memory)
    table = scheduler.kv.block_table(scheduler.requests["a"].seqs[0].seq_id)
    assert sorted(held(memory)) == sorted(table) and len(table) == 3
    assert [memory.blocks[b].fill for b in table] == [4, 4, 2]
    assert memory.figures.internal_fragmentation == 1 - 10 / 12
    info = request_info(scheduler, scheduler.requests["a"], "0")
    assert (info.state, info.prompt_tokens, info.seqs[0].block_table) == ("running", 10, table)


def test_shared_prefix_shows_ref_count_two_and_a_hot_prefix() -> None:
    scheduler = make()
    loop = loop_for(scheduler)
    prompt = list(range(1, 13))  # three full blocks
    scheduler.add_request(req("a", prompt, max_tokens=20))
    loop.step()
    loop.step()  # a's prompt blocks are computed and in the prefix cache
    scheduler.add_request(req("b", prompt + [40, 41], max_tokens=20))
    loop.step()
    memory = memory_map(scheduler, "0")
    check_consistent(scheduler, memory)
    shared = [block for block in memory.blocks if block.ref == 2]
    assert len(shared) == 3
    assert all(block.holders == ["a", "b"] and block.hash is not None for block in shared)
    summary = cache_summary(scheduler, "0")
    assert summary.hits_tokens == 12 and summary.hit_rate > 0
    top = summary.hottest_prefixes[0]
    assert (top.blocks, top.holders, top.score, top.first_block) == (3, ["a", "b"], 6, shared[0].id)
    assert_block_accounting(scheduler)


def test_n_greater_than_one_shares_the_prompt_within_a_request() -> None:
    scheduler = make()
    loop = loop_for(scheduler)
    scheduler.add_request(req("a", list(range(1, 9)), n=2))
    loop.step()
    memory = memory_map(scheduler, "0")
    check_consistent(scheduler, memory)
    assert {tuple(block.holders) for block in memory.blocks if block.ref == 2} == {("a", "a")}


def test_abort_frees_every_block_of_the_request() -> None:
    scheduler = make(prefix_caching=False)
    loop = loop_for(scheduler)
    scheduler.add_request(req("a", list(range(1, 11))))
    scheduler.add_request(req("b", list(range(20, 26))))
    loop.step()
    assert scheduler.abort_request("a")
    memory = memory_map(scheduler, "0")
    check_consistent(scheduler, memory)
    assert all("a" not in block.holders for block in memory.blocks)
    assert memory.figures.held == 2  # b's two blocks
    assert_block_accounting(scheduler)


def test_flush_empties_cached_free_blocks_only() -> None:
    scheduler = make()
    loop = loop_for(scheduler)
    scheduler.add_request(req("done", list(range(1, 17)), max_tokens=4))
    loop.run()
    scheduler.add_request(req("live", list(range(30, 45)), max_tokens=30))
    loop.step()
    loop.step()
    before = memory_map(scheduler, "0")
    held_hashes = {block.id: block.hash for block in before.blocks if block.state == "held"}
    assert before.figures.cached >= 4 and any(held_hashes.values())
    evictions = scheduler.stats().evictions
    flushed = scheduler.kv.evict_cached_free()
    after = memory_map(scheduler, "0")
    check_consistent(scheduler, after)
    assert flushed == before.figures.cached and after.figures.cached == 0
    assert after.figures.free == before.figures.free + flushed
    assert {block.id: block.hash for block in after.blocks if block.state == "held"} == held_hashes
    assert scheduler.stats().evictions == evictions  # a flush takes nothing for reuse
    assert scheduler.kv.probe(req("again", list(range(1, 17))).seqs[0]).num_tokens == 0
    assert_block_accounting(scheduler)


def test_cached_free_blocks_report_hash_and_eviction_order() -> None:
    scheduler = make(num_blocks=16)
    loop = loop_for(scheduler)
    scheduler.add_request(req("a", list(range(1, 13)), max_tokens=2))
    loop.run()
    memory = memory_map(scheduler, "0")
    cached = [block for block in memory.blocks if block.state == "cached"]
    assert len(cached) == 3 and all(block.hash and block.ref == 0 and not block.holders for block in cached)
    assert all(0 <= block.age_s < 60 for block in cached)
    # Free blocks are reused first; among cached ones the tail of the prefix goes before its head.
    free = memory.figures.free
    assert sorted(block.lru for block in cached) == [free, free + 1, free + 2]
    assert min(cached, key=lambda block: block.lru).id == max(block.id for block in cached)


def test_external_fragmentation_is_one_minus_largest_free_run_over_free_blocks() -> None:
    scheduler = make(num_blocks=8, prefix_caching=False)
    loop = loop_for(scheduler)
    for name, first in (("a", 1), ("b", 10), ("c", 20)):
        scheduler.add_request(req(name, list(range(first, first + 8)), max_tokens=2))
    loop.step()  # a holds 0-1, b 2-3, c 4-5
    assert scheduler.abort_request("b")
    figures = memory_map(scheduler, "0").figures
    assert (figures.free, figures.largest_free_run) == (4, 2)
    assert figures.external_fragmentation == 0.5
    assert figures.utilization == 4 / 8


def test_contiguous_allocator_map_shows_whole_reservations() -> None:
    scheduler = make(num_blocks=16, allocator="contiguous")
    loop = loop_for(scheduler)
    scheduler.add_request(req("a", list(range(1, 6)), max_tokens=7))  # reserves 12 tokens: 3 blocks
    loop.step()
    memory = memory_map(scheduler, "0")
    assert memory.allocator == "contiguous"
    assert held(memory) == {0: ["a"], 1: ["a"], 2: ["a"]}
    assert [memory.blocks[b].fill for b in range(3)] == [4, 1, 0]
    assert memory.figures.internal_fragmentation == 1 - 5 / 12


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "step", "abort", "flush"]), st.integers(0, 5), st.integers(1, 20), st.integers(1, 3)),
        min_size=1,
        max_size=30,
    )
)
def test_the_map_matches_the_block_tables_after_any_operations(operations: list[tuple[str, int, int, int]]) -> None:
    scheduler = make(num_blocks=24)
    loop = loop_for(scheduler)
    added = 0
    for operation, which, length, n in operations:
        if operation == "add":
            # Prompts share their first tokens, so prefix hits and shared blocks happen.
            prompt = [1 + (which + i * (i > 6)) % 50 for i in range(length)]
            try:
                scheduler.add_request(req(f"r{added}", prompt, max_tokens=6, n=n))
            except AdmissionError:
                pass
            added += 1
        elif operation == "step" and scheduler.needs_step():
            loop.step()
        elif operation == "abort":
            scheduler.abort_request(f"r{which}")
        elif operation == "flush":
            scheduler.kv.evict_cached_free()
        memory = memory_map(scheduler, "0")
        check_consistent(scheduler, memory)
        holders = sum(prefix.score for prefix in hottest_prefixes(memory.blocks))
        assert holders == sum(block.ref for block in memory.blocks if block.ref > 1)
    assert_block_accounting(scheduler)
