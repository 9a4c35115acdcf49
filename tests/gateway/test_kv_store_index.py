"""The KV store index on its own: slot states, eviction by its policy, flush, stats, one index per store."""

from __future__ import annotations

import pytest

from paged.gateway.eviction_policy import make_policy
from paged.gateway.kv_store_index import KVStoreIndex, KVStoreIndexes


def index_of(num_slots: int) -> KVStoreIndex:
    return KVStoreIndex("store", num_slots, make_policy("lru", num_slots), page_bytes=100)


def test_a_slot_goes_free_saving_ready_and_back() -> None:
    index = index_of(2)
    slot = index.reserve(10, None, 0)
    assert slot is not None and index.lookup(10) is None  # saving: not loadable
    assert index.reserve(10, None, 0) is None  # stored already (being saved): no second save
    index.saved(slot)
    assert index.lookup(10) == slot
    stats = index.stats()
    assert (stats.free_slots, stats.saving_slots, stats.ready_slots, stats.bytes_used) == (1, 0, 1, 100)
    assert index.audit() == []


def test_a_full_store_evicts_by_its_policy_but_never_a_pinned_or_saving_slot() -> None:
    index = index_of(3)
    slots = [index.reserve(block_hash, None, 0) for block_hash in (10, 11, 12)]
    for slot in slots[:2]:
        index.saved(slot)  # type: ignore[arg-type]
    index.pin(slots[0])  # type: ignore[arg-type]  # 10 is being loaded; 12 still saving
    assert index.reserve(13, None, 0) == slots[1]  # only 11 may go
    assert index.lookup(11) is None and index.stats().evictions == 1
    assert index.reserve(14, None, 0) is None  # nothing left to evict: the content is dropped
    assert index.stats().dropped_saves == 1
    index.unpin(slots[0], loaded=True)  # type: ignore[arg-type]
    assert index.reserve(14, None, 0) == slots[0]


def test_quarantined_slots_wait_for_their_writer() -> None:
    index = index_of(2)
    slot = index.reserve(10, None, 0)
    index.abandon(slot, "worker-a")  # type: ignore[arg-type]
    assert index.stats().quarantined_slots == 1 and 10 not in index
    index.release_quarantine("worker-b")
    assert index.stats().quarantined_slots == 1
    index.release_quarantine("worker-a")
    assert index.stats().free_slots == 2 and index.audit() == []


def test_saves_and_loads_count_once_their_step_confirms_them() -> None:
    """An operator's saves and loads are copies that ran; ordered ones that never will are failed."""
    index = index_of(4)
    slots = [index.reserve(block_hash, None, 0) for block_hash in (10, 11, 12)]
    assert (index.stats().saves, index.stats().failed_saves) == (0, 0)  # ordered, not run yet
    index.saved(slots[0])  # type: ignore[arg-type]
    index.saved(slots[1])  # type: ignore[arg-type]
    index.abandon(slots[2], None)  # type: ignore[arg-type]  # its step's page moves failed
    index.pin(slots[0])  # type: ignore[arg-type]
    index.pin(slots[1])  # type: ignore[arg-type]
    assert (index.stats().loads, index.stats().failed_loads) == (0, 0)
    index.unpin(slots[0], loaded=True)  # type: ignore[arg-type]
    index.unpin(slots[1], loaded=False)  # type: ignore[arg-type]
    stats = index.stats()
    assert (stats.saves, stats.failed_saves, stats.loads, stats.failed_loads) == (2, 1, 1, 1)


def test_flush_forgets_what_no_load_reads() -> None:
    index = index_of(3)
    for block_hash in (10, 11, 12):
        index.saved(index.reserve(block_hash, None, 0))  # type: ignore[arg-type]
    index.pin(index.lookup(11))  # type: ignore[arg-type]
    assert index.flush() == 2
    assert index.lookup(11) is not None and index.lookup(10) is None


def test_one_index_per_store_id() -> None:
    indexes = KVStoreIndexes("lfu")
    first = indexes.for_store("host-1", 8, page_bytes=64)
    assert first is not None and first.policy.name == "lfu"
    assert indexes.for_store("host-1", 8) is first
    assert indexes.for_store("", 0) is None  # a worker without a store
    with pytest.raises(ValueError, match="8 slots, a worker reports 9"):
        indexes.for_store("host-1", 9)
    assert indexes.all() == [first]
