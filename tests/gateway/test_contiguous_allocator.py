"""The contiguous baseline: one first-fit run per sequence sized for its whole possible length."""

from __future__ import annotations

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.contiguous_allocator import ContiguousAllocator
from paged.gateway.kv_cache_manager import CacheHit
from paged.gateway.request import Request, Sequence
from paged.shared.sampling_params import SamplingParams

BS = 4


def _seq(prompt_len: int, max_tokens: int, n: int = 1) -> Sequence:
    request = Request("r", list(range(prompt_len)), SamplingParams(n=n, max_tokens=max_tokens))
    for seq in request.seqs:
        seq.max_num_tokens = prompt_len + max_tokens
    return request.seqs[0]


def test_reserves_the_whole_length_up_front() -> None:
    allocator = ContiguousAllocator(10, BS)
    seq = _seq(5, 10)  # 15 tokens -> 4 blocks
    assert allocator.admit(seq, CacheHit(), 5, 0)
    assert allocator.block_table(seq.seq_id) == [0, 1, 2, 3]
    stats = allocator.stats()
    assert (stats.used_blocks, stats.slots_reserved, stats.slots_filled) == (4, 16, 5)
    for _ in range(9):
        assert allocator.grow(seq, 1) == []
    assert allocator.stats().slots_filled == 14
    assert_block_accounting(allocator)


def test_first_fit_and_coalescing() -> None:
    allocator = ContiguousAllocator(10, BS)
    a, b, c = _seq(3, 5), _seq(3, 9), _seq(3, 5)  # 2, 3, 2 blocks
    for seq in (a, b, c):
        assert allocator.admit(seq, CacheHit(), 3, 0)
    allocator.free(a)
    allocator.free(c)
    assert allocator.free_extents() == [(0, 2), (5, 5)]
    big = _seq(3, 13)  # 4 blocks: does not fit in the first hole
    assert allocator.admit(big, CacheHit(), 3, 0)
    assert allocator.block_table(big.seq_id) == [5, 6, 7, 8]
    allocator.free(b)
    assert allocator.free_extents() == [(0, 5), (9, 1)]
    # Fragmentation: 6 blocks free but no run of 6.
    assert not allocator.admit(_seq(3, 21), CacheHit(), 3, 0)
    assert_block_accounting(allocator)


def test_reserve_is_respected() -> None:
    allocator = ContiguousAllocator(4, BS)
    assert not allocator.admit(_seq(3, 9), CacheHit(), 3, reserve_blocks=2)
    assert allocator.admit(_seq(3, 9), CacheHit(), 3, reserve_blocks=1)
    assert_block_accounting(allocator)


def test_parallel_sampling_reserves_a_run_per_sequence_and_copies_the_prompt() -> None:
    allocator = ContiguousAllocator(20, BS)
    parent = _seq(6, 6, n=3)  # 12 tokens -> 3 blocks each
    assert allocator.admit(parent, CacheHit(), 6, 0, num_children=2)
    assert allocator.stats().used_blocks == 9
    assert_block_accounting(allocator)
    child = parent.request.seqs[1]
    copies = allocator.fork(parent, child)
    table_from, table = allocator.take_table_delta(child)
    assert table_from == 0 and len(table) == 3
    assert [(c.src, c.dst) for c in copies] == list(zip(allocator.block_table(parent.seq_id)[:2], table[:2], strict=True))
    assert allocator.grow(child, 1) == []
    assert allocator.stats().shared_blocks == 0
    allocator.free(parent)  # also releases the unforked child's run
    allocator.free(child)
    assert allocator.stats().used_blocks == 0
    assert_block_accounting(allocator)


def test_no_prefix_cache_and_no_swap() -> None:
    allocator = ContiguousAllocator(10, BS)
    seq = _seq(9, 3)
    assert allocator.probe(seq).num_tokens == 0
    assert allocator.match_prefix(list(range(9)), None) == 0
    allocator.admit(seq, CacheHit(), 9, 0)
    assert allocator.swap_out([seq]) is None
    assert_block_accounting(allocator)
