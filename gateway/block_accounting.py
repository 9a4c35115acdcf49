"""Block accounting audit: the invariants every test step checks, and the admin API can report.

Paged: every block is exactly one of free, cached-free or held; a block's ref count equals the
number of block tables holding it; the hash map and the pool's counters agree with the blocks.
Contiguous: free extents and reserved runs partition the pool. Scheduler: exactly the running and
swapped sequences hold blocks, each as many slots as it has computed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from paged.gateway.block_pool import BlockPool
from paged.gateway.contiguous_allocator import ContiguousAllocator
from paged.gateway.kv_cache_manager import KVCacheManager
from paged.gateway.request import SequenceStatus
from paged.gateway.scheduler import Scheduler


@dataclass(slots=True)
class AccountingReport:
    num_free: int = 0
    num_cached_free: int = 0
    num_held: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _audit_pool(pool: BlockPool, tables: list[list[int]], report: AccountingReport, name: str) -> None:
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
    if name == "device" and pool.num_filled_slots != filled:
        report.problems.append(f"{name}: filled-slot counter {pool.num_filled_slots}, counted {filled}")


def audit_manager(manager: KVCacheManager | ContiguousAllocator) -> AccountingReport:
    report = AccountingReport()
    if isinstance(manager, ContiguousAllocator):
        _audit_contiguous(manager, report)
        return report
    device = [record.table for record in manager.seqs.values() if not record.swapped]
    host = [record.table for record in manager.seqs.values() if record.swapped]
    _audit_pool(manager.pool, device, report, "device")
    host_report = AccountingReport()
    _audit_pool(manager.host_pool, host, host_report, "host")
    report.problems += host_report.problems
    size = manager.block_size
    for seq_id, record in manager.seqs.items():
        if len(record.table) != -(-record.num_slots // size):
            report.problems.append(f"seq {seq_id}: {len(record.table)} blocks for {record.num_slots} slots")
    return report


def _audit_contiguous(manager: ContiguousAllocator, report: AccountingReport) -> None:
    owners = [0] * manager.num_blocks
    runs = [record.table for record in manager.seqs.values()] + manager.fork_runs()
    for run in runs:
        if run != list(range(run[0], run[0] + len(run))):
            report.problems.append(f"run starting at {run[0]} is not contiguous")
        for block in run:
            owners[block] += 1
    for start, length in manager.free_extents():
        for block in range(start, start + length):
            owners[block] += 1
            report.num_free += 1
    report.num_held = manager.num_blocks - report.num_free
    for block, count in enumerate(owners):
        if count != 1:
            report.problems.append(f"block {block} is owned {count} times (free extents + runs)")
    if manager.num_free_blocks != report.num_free:
        report.problems.append(f"free counter {manager.num_free_blocks}, counted {report.num_free}")


def audit_scheduler(scheduler: Scheduler) -> AccountingReport:
    """The manager's own invariants plus: exactly the running and swapped sequences hold blocks."""
    report = audit_manager(scheduler.kv)
    holding = {seq.seq_id for seq in scheduler.running}
    holding |= {seq.seq_id for request in scheduler.swapped for seq in request.live_seqs()}
    if set(scheduler.kv.seqs) != holding:
        report.problems.append(
            f"block tables for {sorted(set(scheduler.kv.seqs))} but running/swapped are {sorted(holding)}"
        )
    for seq in scheduler.running:
        if seq.status is not SequenceStatus.RUNNING:
            report.problems.append(f"seq {seq.seq_id} in the running list is {seq.status.value}")
        record = scheduler.kv.seqs.get(seq.seq_id)
        if record is not None and record.num_slots != seq.num_computed:
            report.problems.append(f"seq {seq.seq_id}: {record.num_slots} slots for {seq.num_computed} computed tokens")
    if len(scheduler.running) > scheduler.config.max_num_seqs:
        report.problems.append(f"{len(scheduler.running)} running sequences > max_num_seqs")
    for request in scheduler.waiting:
        for seq in request.live_seqs():
            if seq.status is not SequenceStatus.WAITING:
                report.problems.append(f"seq {seq.seq_id} of waiting request {request.request_id} is {seq.status.value}")
    return report


def assert_block_accounting(scheduler_or_manager: Scheduler | KVCacheManager | ContiguousAllocator) -> None:
    if isinstance(scheduler_or_manager, Scheduler):
        report = audit_scheduler(scheduler_or_manager)
    else:
        report = audit_manager(scheduler_or_manager)
    assert report.ok, "block accounting: " + "; ".join(report.problems[:20])
