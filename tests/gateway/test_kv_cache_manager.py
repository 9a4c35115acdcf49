"""Paged KV cache manager: block tables, prefix caching, fork + copy-on-write, swap, stats.
Every test ends with the accounting audit."""

from __future__ import annotations

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.kv_cache_manager import KVCacheManager
from paged.gateway.kv_store_index import KVStoreIndexes
from paged.gateway.kv_store_session import KVStoreSession
from paged.gateway.request import Request, Sequence
from paged.shared.protocol import BlockCopy
from paged.shared.sampling_params import SamplingParams

BS = 4


def _seq(prompt: list[int], n: int = 1, salt: str | None = None) -> Sequence:
    request = Request("r", prompt, SamplingParams(n=n, max_tokens=8), cache_salt=salt)
    return request.seqs[0]


def _run_prompt(manager: KVCacheManager, seq: Sequence) -> int:
    """Admit a sequence for its whole prompt and mark it computed; returns the cached tokens."""
    hit = manager.probe(seq)
    assert manager.admit(seq, hit, seq.num_tokens - hit.num_tokens, 0)
    seq.num_computed = seq.num_tokens
    manager.cache_computed(seq, seq.num_computed)
    return hit.num_tokens


def test_admit_allocates_whole_blocks_and_sends_the_table_once() -> None:
    manager = KVCacheManager(10, BS)
    seq = _seq(list(range(10)))
    assert _run_prompt(manager, seq) == 0
    table = manager.block_table(seq.seq_id)
    assert len(table) == 3
    assert manager.take_table_delta(seq) == (0, table)
    assert manager.take_table_delta(seq) == (3, [])
    stats = manager.stats()
    assert (stats.used_blocks, stats.slots_reserved, stats.slots_filled) == (3, 12, 10)
    manager.free(seq)
    assert manager.stats().used_blocks == 0
    assert_block_accounting(manager)


def test_prefix_hit_reuses_cached_blocks_and_leaves_one_token_to_compute() -> None:
    manager = KVCacheManager(10, BS)
    first = _seq(list(range(8)))
    _run_prompt(manager, first)
    first_table = manager.block_table(first.seq_id)
    manager.free(first)
    assert manager.stats().cached_blocks == 2
    # Same 8 tokens: both blocks are cached but the last token must be computed -> 1 block hit.
    again = _seq(list(range(8)))
    assert _run_prompt(manager, again) == 4
    assert manager.block_table(again.seq_id)[0] == first_table[0]
    # A longer prompt with the same prefix hits both blocks.
    longer = _seq(list(range(8)) + [99, 98])
    assert manager.probe(longer).num_tokens == 8
    assert manager.match_prefix(list(range(8)) + [99], None) == 8
    assert manager.match_prefix([5] * 9, None) == 0
    manager.free(again)
    assert_block_accounting(manager)


def test_cache_salt_isolates_tenants() -> None:
    manager = KVCacheManager(10, BS)
    _run_prompt(manager, _seq(list(range(9)), salt="a"))
    assert manager.probe(_seq(list(range(9)), salt="a")).num_tokens == 8
    assert manager.probe(_seq(list(range(9)), salt="b")).num_tokens == 0
    assert manager.probe(_seq(list(range(9)))).num_tokens == 0
    assert manager.match_prefix(list(range(9)), "b") == 0
    assert_block_accounting(manager)


def test_prefix_caching_off_never_hits() -> None:
    manager = KVCacheManager(10, BS, enable_prefix_caching=False)
    seq = _seq(list(range(9)))
    _run_prompt(manager, seq)
    manager.free(seq)
    assert _run_prompt(manager, _seq(list(range(9)))) == 0
    assert manager.stats().cached_blocks == 0


def test_eviction_takes_the_chain_tail_first() -> None:
    manager = KVCacheManager(4, BS)
    seq = _seq(list(range(12)) + [50])
    _run_prompt(manager, seq)  # 4 blocks, 3 full and cached
    table = manager.block_table(seq.seq_id)
    manager.free(seq)
    other = _seq([7] * 3)
    _run_prompt(manager, other)  # takes the uncached partial block first
    assert manager.block_table(other.seq_id) == [table[3]]
    other2 = _seq([8] * 3)
    _run_prompt(manager, other2)  # evicts the tail of the cached chain
    assert manager.block_table(other2.seq_id) == [table[2]]
    assert manager.stats().evictions == 1
    assert manager.probe(_seq(list(range(12)) + [50])).num_tokens == 8
    assert_block_accounting(manager)


def test_grow_crosses_block_boundaries_and_reports_shortage_without_changes() -> None:
    manager = KVCacheManager(3, BS)
    seq = _seq([1, 2, 3])
    _run_prompt(manager, seq)
    assert manager.grow(seq, 1) == []  # slot 3, same block
    seq.num_computed += 1
    assert manager.grow(seq, 6) == []  # slots 4..9: two more blocks
    seq.num_computed += 6
    assert len(manager.block_table(seq.seq_id)) == 3
    assert manager.grow(seq, 3) is None  # needs a 4th block
    assert len(manager.block_table(seq.seq_id)) == 3
    assert manager.stats().slots_filled == 10
    assert_block_accounting(manager)


def test_admit_keeps_the_reserve_free() -> None:
    manager = KVCacheManager(4, BS)
    seq = _seq(list(range(10)))
    hit = manager.probe(seq)
    assert not manager.admit(seq, hit, 10, reserve_blocks=2)
    assert manager.admit(seq, hit, 10, reserve_blocks=1)
    assert_block_accounting(manager)


def test_fork_shares_blocks_and_copy_on_write_on_first_append() -> None:
    manager = KVCacheManager(10, BS)
    parent = _seq(list(range(6)), n=3)
    children = parent.request.seqs[1:]
    _run_prompt(manager, parent)
    manager.take_table_delta(parent)
    for child in children:
        manager.fork(parent, child)
        child.num_computed = parent.num_computed
    table = manager.block_table(parent.seq_id)
    assert manager.stats().shared_blocks == 2
    assert manager.stats().used_blocks == 2
    # Child 1 appends into the shared partial block 1 -> copy-on-write.
    copies = manager.grow(children[0], 1)
    assert copies is not None and len(copies) == 1
    assert copies[0].src == table[1]
    table_from, new_blocks = manager.take_table_delta(children[0])
    assert table_from == 1 and new_blocks == [copies[0].dst]
    assert manager.block_table(children[0].seq_id)[0] == table[0]  # full block still shared
    # Child 2 copies too; the parent is then the block's only holder and writes in place.
    assert len(manager.grow(children[1], 1)) == 1
    assert manager.grow(parent, 1) == []
    assert manager.take_table_delta(parent) == (2, [])
    assert manager.stats().shared_blocks == 1
    for seq in (parent, *children):
        manager.free(seq)
    assert manager.stats().used_blocks == 0
    assert_block_accounting(manager)


def test_fork_after_a_full_block_prompt_needs_no_copy() -> None:
    manager = KVCacheManager(10, BS)
    parent = _seq(list(range(8)), n=2)
    child = parent.request.seqs[1]
    _run_prompt(manager, parent)
    manager.fork(parent, child)
    assert manager.grow(child, 1) == []
    assert manager.grow(parent, 1) == []
    assert manager.block_table(child.seq_id)[:2] == manager.block_table(parent.seq_id)[:2]
    assert_block_accounting(manager)


def test_swap_out_and_in_copies_shared_blocks_once() -> None:
    manager = KVCacheManager(8, BS, num_host_blocks=4)
    parent = _seq(list(range(6)), n=2)
    child = parent.request.seqs[1]
    _run_prompt(manager, parent)
    manager.fork(parent, child)
    out = manager.swap_out([parent, child])
    assert out is not None and len(out) == 2
    assert manager.stats().used_blocks == 0
    assert manager.stats().host_free_blocks == 2
    assert_block_accounting(manager)
    back = manager.swap_in([parent, child], reserve_blocks=0)
    assert back is not None and len(back) == 2
    assert {copy.src for copy in back} == {copy.dst for copy in out}
    assert manager.block_table(parent.seq_id) == manager.block_table(child.seq_id)
    assert manager.take_table_delta(child)[0] == 0  # the worker gets the whole new table
    assert manager.stats().host_free_blocks == 4
    assert manager.stats().slots_filled == 6
    assert_block_accounting(manager)


def test_swap_out_fails_cleanly_when_the_host_pool_is_short() -> None:
    manager = KVCacheManager(8, BS, num_host_blocks=1)
    seq = _seq(list(range(6)))
    _run_prompt(manager, seq)
    assert manager.swap_out([seq]) is None
    assert manager.stats().used_blocks == 2
    assert_block_accounting(manager)


def test_block_copy_is_the_protocol_struct() -> None:
    manager = KVCacheManager(4, BS)
    parent = _seq([1, 2], n=2)
    _run_prompt(manager, parent)
    manager.fork(parent, parent.request.seqs[1])
    (copy,) = manager.grow(parent, 1)
    assert isinstance(copy, BlockCopy)


def test_a_chain_mixes_pool_and_store_links_and_the_store_links_load_into_new_blocks() -> None:
    index = KVStoreIndexes("lru").for_store("host", 8)
    assert index is not None
    session = KVStoreSession(index, "w")
    manager = KVCacheManager(10, BS, store=session)
    prompt = list(range(14))  # three full blocks and a partial one
    first = _seq(prompt)
    _run_prompt(manager, first)
    table = manager.block_table(first.seq_id)
    manager.free(first)
    hashes = first.block_hashes
    # The middle link leaves the pool for the store (as an eviction would save it).
    slot = index.reserve(hashes[1], hashes[0], 1)
    assert slot is not None
    index.saved(slot)
    manager.pool.unregister(table[1])
    again = _seq(prompt[:13] + [77])
    hit = manager.probe(again)
    assert (hit.blocks, hit.store_hits, hit.num_tokens) == ([table[0], table[2]], [(1, slot)], 12)
    assert manager.match_prefix(prompt, None) == 12
    assert manager.admit(again, hit, 2, 0)
    new_table = manager.block_table(again.seq_id)
    assert new_table[0] == table[0] and new_table[2] == table[2] and new_table[1] not in table[:3]
    _, loads = session.take(step_id=5)
    assert loads == [BlockCopy(slot, new_table[1])]
    assert manager.pool.lookup(hashes[1]) == new_table[1]  # findable at once: the load runs first
    assert index.stats().pinned_slots == 1
    assert_block_accounting(manager)
