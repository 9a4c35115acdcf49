"""Block accounting audit: the invariants every test step checks, and the admin API can report.

Each allocator audits itself (`audit()`, beside its own bookkeeping): paged, every block is exactly
one of free, cached-free or held, a block's ref count equals the number of block tables holding
it, and the hash map, the eviction policy and the pool's counters agree with the blocks
(`audit_pool` below); with a KV store, its index agrees with its slots and with the saves and loads
in flight (gateway/kv_store_index.py);
contiguous, free extents and reserved runs partition the pool. The scheduler adds its own
(Scheduler.audit): exactly the running and swapped sequences hold blocks, each as many slots as it
has computed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from paged.gateway.block_pool import BlockPool


@dataclass(slots=True)
class AccountingReport:
    num_free: int = 0
    num_cached_free: int = 0
    num_held: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Auditable(Protocol):
    def audit(self) -> AccountingReport: ...


def audit_pool(pool: BlockPool, tables: list[list[int]], report: AccountingReport, name: str, count_fill: bool = True) -> None:
    """A BlockPool against the block tables that hold its blocks."""
    holders = Counter(block for table in tables for block in table)
    free = set(pool.free_queue())
    if len(free) != pool.num_free:
        report.problems.append(f"{name}: free queue has duplicates")
    filled = 0
    shared = 0
    for block in range(pool.num_blocks):
        ref = pool.ref_counts[block]
        if ref != holders.get(block, 0):
            report.problems.append(f"{name}: block {block} ref count {ref} but {holders.get(block, 0)} tables hold it")
        if ref > 0:
            report.num_held += 1
            filled += pool.fill[block]
            shared += ref > 1
            if block in free:
                report.problems.append(f"{name}: block {block} is held and in the free queue")
        elif block not in free:
            report.problems.append(f"{name}: block {block} is neither held nor in the free queue")
        elif pool.block_hashes[block] is None:
            report.num_free += 1
        else:
            report.num_cached_free += 1
    for block in holders:
        if not 0 <= block < pool.num_blocks:
            report.problems.append(f"{name}: a table holds block {block}, outside the pool")
    cache = pool.cached_blocks()
    for block_hash, block in cache.items():
        if pool.block_hashes[block] != block_hash:
            report.problems.append(f"{name}: cache maps a hash to block {block}, which has another hash")
    hashed = sum(1 for block_hash in pool.block_hashes if block_hash is not None)
    if hashed != len(cache):
        report.problems.append(f"{name}: {hashed} blocks have a hash but the cache maps {len(cache)}")
    if pool.num_cached_free != report.num_cached_free:
        report.problems.append(f"{name}: cached-free counter {pool.num_cached_free}, counted {report.num_cached_free}")
    if pool.num_shared != shared:
        report.problems.append(f"{name}: shared counter {pool.num_shared}, counted {shared}")
    if count_fill and pool.num_filled_slots != filled:
        report.problems.append(f"{name}: filled-slot counter {pool.num_filled_slots}, counted {filled}")
    report.problems += [f"{name}: {problem}" for problem in pool.audit_policy()]


def assert_block_accounting(subject: Auditable) -> None:
    """A scheduler or an allocator passes its audit (the first problems are in the message)."""
    report = subject.audit()
    assert report.ok, "block accounting: " + "; ".join(report.problems[:20])
