"""A read-only picture of one worker's page pool, for the admin API and `pagedctl memmap`.

The scheduler's block allocator describes its blocks (BlockAllocator.describe): every block with
its state (free, cached-free, held), who holds it, its ref count and filled token slots; here they
get the pool's figures, the prefix cache's summary and the requests' views. The admin API runs in the engine's event loop, so a map is consistent
with the scheduler (no step updates it halfway).

Figures, as reported:
- utilization: held blocks / all blocks (how much of the pool live requests hold).
- slot_utilization: token slots holding tokens / token slots in held blocks.
- internal_fragmentation: 1 - slot_utilization, the reserved-but-empty slots (partly filled last
  blocks; for the contiguous allocator also every slot reserved for tokens not generated yet).
- external_fragmentation: 1 - largest run of consecutive allocatable block ids / allocatable
  blocks (allocatable = free + cached-free). 0 when the free space is one run or empty. A paged
  allocator never needs a run, so it only matters for `--kv-allocator contiguous`, where it is why
  a request can be refused with enough free blocks in total.
"""

from __future__ import annotations

import time
from collections import defaultdict

import msgspec

from paged.gateway.block_allocator import BlockInfo
from paged.gateway.request import Request, SequenceStatus
from paged.gateway.scheduler import Scheduler
from paged.gateway.stats import KVStoreStats, PoolStats

HOTTEST_PREFIXES = 10


class PoolFigures(msgspec.Struct):
    num_blocks: int
    block_size: int
    free: int
    cached: int
    held: int
    shared: int  # held by more than one block table
    slots_reserved: int
    slots_filled: int
    utilization: float
    slot_utilization: float
    internal_fragmentation: float
    external_fragmentation: float
    largest_free_run: int


class MemoryMap(msgspec.Struct):
    worker: str
    allocator: str  # "paged" or "contiguous"
    figures: PoolFigures
    blocks: list[BlockInfo]


class SharedPrefix(msgspec.Struct):
    """Blocks held by the same set of block tables: a prompt prefix several sequences share."""

    blocks: int
    holders: list[str]
    score: int  # blocks × holders: the block copies sharing saves
    first_block: int
    hash: str | None


class CacheSummary(msgspec.Struct):
    """The prefix cache of one worker: its pool tier, and the host KV store tier it shares (if any)."""

    worker: str
    enabled: bool
    cached_free_blocks: int  # unreferenced, reusable by a prefix hit until evicted
    cached_held_blocks: int  # held and findable by a prefix hit
    queries_tokens: int
    hits_tokens: int  # from either tier
    hit_rate: float
    evictions: int
    hottest_prefixes: list[SharedPrefix]
    eviction_policy: str = ""  # the pool's ("" for an allocator without a prefix cache)
    store_hits_tokens: int = 0  # of hits_tokens, loaded from the store
    store_misses_tokens: int = 0
    store: KVStoreStats | None = None  # the store this worker attached


def _holder_names(scheduler: Scheduler) -> dict[int, str]:
    """Seq id -> the id of its request, for every sequence of the scheduler's requests."""
    return {seq.seq_id: request.request_id for request in scheduler.requests.values() for seq in request.seqs}


def _largest_run(allocatable: list[bool]) -> int:
    best = run = 0
    for free in allocatable:
        run = run + 1 if free else 0
        best = max(best, run)
    return best


def _figures(stats: PoolStats, blocks: list[BlockInfo]) -> PoolFigures:
    allocatable = [block.state != "held" for block in blocks]
    num_allocatable = sum(allocatable)
    largest = _largest_run(allocatable)
    return PoolFigures(
        num_blocks=stats.num_blocks,
        block_size=stats.block_size,
        free=stats.free_blocks,
        cached=stats.cached_blocks,
        held=stats.used_blocks,
        shared=stats.shared_blocks,
        slots_reserved=stats.slots_reserved,
        slots_filled=stats.slots_filled,
        utilization=stats.used_blocks / stats.num_blocks if stats.num_blocks else 0.0,
        slot_utilization=stats.kv_utilization,
        internal_fragmentation=1.0 - stats.kv_utilization if stats.slots_reserved else 0.0,
        external_fragmentation=1.0 - largest / num_allocatable if num_allocatable else 0.0,
        largest_free_run=largest,
    )


def memory_map(scheduler: Scheduler, worker: str) -> MemoryMap:
    """The worker's pool as its allocator describes it (gateway/block_allocator.py)."""
    kv = scheduler.kv
    blocks = kv.describe(_holder_names(scheduler))
    return MemoryMap(worker, kv.kind, _figures(kv.stats(), blocks), blocks)


def hottest_prefixes(blocks: list[BlockInfo], limit: int = HOTTEST_PREFIXES) -> list[SharedPrefix]:
    """Group shared held blocks by the exact set of tables holding them, largest saving first."""
    groups: dict[tuple[str, ...], list[BlockInfo]] = defaultdict(list)
    for block in blocks:
        if block.state == "held" and block.ref > 1:
            groups[tuple(sorted(block.holders))].append(block)
    prefixes = [
        SharedPrefix(len(members), list(holders), len(members) * len(holders), members[0].id, members[0].hash)
        for holders, members in groups.items()
    ]
    prefixes.sort(key=lambda prefix: (-prefix.score, prefix.first_block))
    return prefixes[:limit]


def cache_summary(scheduler: Scheduler, worker: str) -> CacheSummary:
    stats = scheduler.stats()
    blocks = memory_map(scheduler, worker).blocks
    return CacheSummary(
        worker=worker,
        enabled=scheduler.kv.enable_prefix_caching,
        cached_free_blocks=stats.cached_blocks,
        cached_held_blocks=sum(1 for block in blocks if block.state == "held" and block.hash is not None),
        queries_tokens=stats.prefix_queries_tokens,
        hits_tokens=stats.prefix_hits_tokens,
        hit_rate=stats.prefix_hit_rate,
        evictions=stats.evictions,
        hottest_prefixes=hottest_prefixes(blocks),
        eviction_policy=scheduler.cache_config.kv_eviction_policy if scheduler.kv.kind == "paged" else "",
        store_hits_tokens=stats.store_hits_tokens,
        store_misses_tokens=stats.store_misses_tokens,
        store=scheduler.store.index.stats() if scheduler.store is not None else None,
    )


class SeqInfo(msgspec.Struct):
    index: int
    status: str
    tokens: int  # known tokens (prompt + generated)
    computed: int  # tokens whose KV is in the cache or being computed
    block_table: list[int]
    swapped: bool  # block_table holds host-pool block ids


class RequestInfo(msgspec.Struct):
    id: str
    worker: str
    state: str  # "waiting", "running", "transferring" or "swapped"
    priority: int
    prompt_tokens: int
    generated_tokens: int  # summed over the request's sequences
    cached_tokens: int  # prompt tokens served from the prefix cache
    waiting_s: float  # arrival to first scheduling (or to now, while it has not been scheduled)
    running_s: float  # since first scheduling
    preemptions: int
    seqs: list[SeqInfo]


def _request_state(request: Request) -> str:
    statuses = {seq.status for seq in request.live_seqs()}
    for status in (SequenceStatus.RUNNING, SequenceStatus.TRANSFERRING, SequenceStatus.SWAPPED):
        if status in statuses:
            return status.value
    return SequenceStatus.WAITING.value


def request_info(scheduler: Scheduler, request: Request, worker: str, now: float | None = None) -> RequestInfo:
    now = time.monotonic() if now is None else now
    started = request.first_scheduled_time
    tables = scheduler.kv.seqs
    seqs = []
    for seq in request.live_seqs():
        record = tables.get(seq.seq_id)
        table = list(record.table) if record is not None else []
        swapped = bool(record is not None and record.swapped)
        seqs.append(SeqInfo(seq.index, seq.status.value, len(seq.token_ids), seq.num_computed, table, swapped))
    return RequestInfo(
        id=request.request_id,
        worker=worker,
        state=_request_state(request),
        priority=request.priority,
        prompt_tokens=request.num_prompt_tokens,
        generated_tokens=sum(seq.num_output_tokens for seq in request.seqs),
        cached_tokens=request.num_cached_tokens,
        waiting_s=(started if started is not None else now) - request.arrival_time,
        running_s=now - started if started is not None else 0.0,
        preemptions=request.num_preemptions,
        seqs=seqs,
    )

