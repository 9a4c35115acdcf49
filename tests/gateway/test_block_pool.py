"""BlockPool: O(1) free queue order, ref counts, lazy eviction of cached blocks."""

from __future__ import annotations

import pytest

from paged.gateway.block_hash import extend_block_hashes, hash_block
from paged.gateway.block_pool import BlockPool


def _states(pool: BlockPool) -> tuple[int, int, int]:
    """(free, cached-free, held) counted from the blocks; each block must be exactly one."""
    free_queue = set(pool.free_queue())
    held = sum(1 for ref in pool.ref_counts if ref > 0)
    cached = sum(1 for block in free_queue if pool.block_hashes[block] is not None)
    assert held + len(free_queue) == pool.num_blocks
    assert not any(pool.ref_counts[block] for block in free_queue)
    assert cached == pool.num_cached_free
    return len(free_queue) - cached, cached, held


def test_allocate_and_free_round_trip() -> None:
    pool = BlockPool(8)
    blocks = pool.allocate(3)
    assert blocks == [0, 1, 2]
    assert _states(pool) == (5, 0, 3)
    pool.free(reversed(blocks))
    assert _states(pool) == (8, 0, 0)


def test_allocating_more_than_free_raises() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="3 blocks with 2 free"):
        pool.allocate(3)


def test_double_free_raises() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError):
        pool.free([block])


def test_uncached_blocks_are_reused_before_cached_ones() -> None:
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    pool.register(a, 111)
    pool.register(b, 222)
    pool.free([b, a])  # a table freed in reverse: tail first
    pool.free([c])
    assert _states(pool) == (1, 2, 1)
    # c (no hash) is reused first, then the cached chain tail b before its head a.
    assert pool.free_queue() == [c, b, a]
    assert pool.allocate(1) == [c]
    assert pool.allocate(1) == [b]
    assert pool.lookup(222) is None  # evicted lazily when popped
    assert pool.lookup(111) == a
    assert pool.num_evictions == 1
    assert _states(pool) == (0, 1, 3)


def test_touch_revives_a_cached_free_block_out_of_lru_order() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for block, block_hash in zip(blocks, (1, 2, 3), strict=True):
        pool.register(block, block_hash)
    pool.free(blocks)
    assert _states(pool) == (0, 3, 0)
    pool.touch([blocks[1]])  # a prefix hit on the middle of the queue
    assert pool.free_queue() == [blocks[0], blocks[2]]
    assert pool.ref_counts[blocks[1]] == 1
    assert _states(pool) == (0, 2, 1)


def test_shared_and_filled_counters() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.set_fill(a, 16)
    pool.set_fill(b, 3)
    pool.touch([a])
    assert pool.num_shared == 1
    assert pool.num_filled_slots == 19
    pool.free([a])
    assert pool.num_shared == 0
    pool.free([b, a])
    assert pool.num_filled_slots == 0
    assert _states(pool) == (4, 0, 0)


def test_duplicate_content_is_not_registered_twice() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, 7)
    pool.register(b, 7)
    assert pool.lookup(7) == a
    assert pool.block_hashes[b] is None


def test_block_hash_chain_depends_on_parent_tokens_and_salt() -> None:
    first = hash_block(None, [1, 2, 3, 4], None)
    assert first == hash_block(None, [1, 2, 3, 4], None)
    assert first != hash_block(None, [1, 2, 3, 5], None)
    assert first != hash_block(None, [1, 2, 3, 4], "tenant-a")
    assert hash_block(first, [5], None) != hash_block(None, [5], None)
    hashes: list[int] = []
    extend_block_hashes(hashes, list(range(10)), 10, 4, None)
    assert len(hashes) == 2  # only full blocks
    assert hashes[1] == hash_block(hashes[0], [4, 5, 6, 7], None)


def test_reusing_a_cached_block_tells_the_eviction_hook_but_a_flush_does_not() -> None:
    pool = BlockPool(3)
    heard: list[tuple[int, int, int | None, int]] = []
    pool.on_evict = lambda *evicted: heard.append(evicted)
    a, b, c = pool.allocate(3)
    pool.register(a, 10)
    pool.register(b, 11, parent=10, depth=1)
    pool.free([c, b, a])
    assert pool.allocate(2) == [c, b]  # the free block, then the chain's tail (leaf first)
    assert heard == [(b, 11, 10, 1)]
    assert pool.evict_cached_free() == 1 and len(heard) == 1


def test_only_evictions_for_reuse_are_counted() -> None:
    """`num_evictions` is the denominator of the refetch share (only content taken for reuse can be
    refetched): a flush or forgetting untrusted content drops cached content but evicts nothing."""
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    for block, block_hash in zip((a, b, c, d), (10, 11, 12, 13), strict=True):
        pool.register(block, block_hash)
    pool.free([d, c, b])
    pool.allocate(1)  # takes d, the least recently freed: one eviction for reuse
    pool.unregister(c)  # cached-free
    pool.unregister(a)  # held
    assert pool.evict_cached_free() == 1  # b
    assert pool.num_evictions == 1


def test_unregistering_forgets_content_held_or_cached() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, 10)
    pool.register(b, 11, parent=10, depth=1)
    pool.unregister(a)  # held
    pool.free([b])
    pool.unregister(b)  # cached-free: becomes plainly free
    assert pool.cached_blocks() == {} and pool.num_cached_free == 0
    assert pool.audit_policy() == []
    pool.free([a])
    assert sorted(pool.free_queue()) == [a, b]


def test_content_asked_for_again_soon_after_its_eviction_counts_once_as_refetched() -> None:
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    pool.register(first, 101)
    pool.register(second, 102)
    pool.free([second, first])
    pool.allocate(2)  # evicts both
    assert pool.num_evictions == 2
    pool.count_refetches([101, 102, 103])
    pool.count_refetches([101])  # counted already
    assert pool.num_refetched == 2
    pool.count_refetches([999, 101])  # only a leading run of evicted content is about to be computed
    assert pool.num_refetched == 2
