"""What the scheduler, the engine and the admin views need of a KV block allocator: the
`BlockAllocator` protocol, the records it hands out, and the block tables (`BlockTables`) both
implementations keep.

Two implementations: `KVCacheManager` (gateway/kv_cache_manager.py), paged, with prefix caching,
fork and copy-on-write and a host pool for swapping; `ContiguousAllocator`
(gateway/contiguous_allocator.py), the one-run-per-sequence baseline. The scheduler never asks
which one it has: an allocator without prefix caching probes no hits, one without a host pool
refuses swap-outs, one that shares nothing reports no shared prompt blocks. Each describes its own
blocks for the memory map (`describe`) and audits its own accounting (`audit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import msgspec

from paged.gateway.block_hash import BlockHash
from paged.gateway.request import Sequence
from paged.gateway.stats import PoolStats
from paged.shared.protocol import BlockCopy

if TYPE_CHECKING:
    from paged.gateway.block_accounting import AccountingReport

HASH_PREFIX_HEX = 12  # enough to tell cached prefixes apart on screen


@dataclass(slots=True)
class CacheHit:
    """Prefix-cache blocks a sequence would reuse (not yet taken). With a KV store tier, links of
    the chain found only in the store are loaded into new blocks at admission."""

    blocks: list[int] = field(default_factory=list)  # device blocks of the links the pool holds, in chain order
    num_tokens: int = 0  # tokens of the whole chain, from either tier
    store_hits: list[tuple[int, int]] = field(default_factory=list)  # (index in the chain, store slot)
    store_miss_tokens: int = 0  # tokens of full blocks in neither tier (with a store only)


@dataclass(slots=True)
class SeqBlocks:
    """A sequence's block table and what the worker already knows of it."""

    table: list[int]
    num_slots: int  # leading token slots in use (computed or being computed)
    num_sent: int = 0  # leading table entries the worker has; the next delta starts there
    num_registered: int = 0  # leading full blocks offered to the prefix cache
    swapped: bool = False  # table holds host block ids


class BlockInfo(msgspec.Struct, omit_defaults=True):
    """One block as the memory map shows it. `holders` names one request per block table holding
    it, so len(holders) == ref. Fields at their default (0, empty, None) are left out of the JSON:
    a pool has thousands of blocks."""

    id: int
    state: str  # "free", "cached" (cached-free) or "held"
    ref: int = 0
    fill: int = 0  # token slots holding tokens (held blocks)
    holders: list[str] = []
    hash: str | None = None  # prefix of the content hash (cached-free, and held blocks in the cache)
    lru: int | None = None  # cached-free: how many free blocks are reused before this one (0: next)
    age_s: float | None = None  # cached-free: seconds since its last holder freed it


def hash_prefix(block_hash: int | None) -> str | None:
    return None if block_hash is None else f"{block_hash:032x}"[:HASH_PREFIX_HEX]


class BlockTables:
    """The per-sequence block tables both allocators keep, and the deltas that bring the worker's up to date."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.seqs: dict[int, SeqBlocks] = {}

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def take_table_delta(self, seq: Sequence) -> tuple[int, list[int]]:
        """(table_from, new_blocks) the worker needs to bring its table up to date."""
        record = self.seqs[seq.seq_id]
        table_from = record.num_sent
        num_blocks = len(record.table)
        if table_from == num_blocks:
            return table_from, []
        record.num_sent = num_blocks
        return table_from, record.table[table_from:]

    def block_table(self, seq_id: int) -> list[int]:
        return list(self.seqs[seq_id].table)

    def holds(self, seq: Sequence) -> bool:
        return seq.seq_id in self.seqs


def holders_by_block(seqs: Mapping[int, SeqBlocks], names: Mapping[int, str]) -> dict[int, list[str]]:
    """Block id -> the name of each device block table holding it (seq ids without a name show as seq-N)."""
    holders: dict[int, list[str]] = {}
    for seq_id, record in seqs.items():
        if record.swapped:
            continue
        owner = names.get(seq_id, f"seq-{seq_id}")
        for block in record.table:
            holders.setdefault(block, []).append(owner)
    return holders


class BlockAllocator(Protocol):
    """Block tables for the scheduler's sequences over one worker's page pool."""

    kind: str  # "paged" or "contiguous", as the admin API names it
    block_size: int
    enable_prefix_caching: bool
    # Whether sequences take blocks as they grow, so that the pool can be promised to more than it
    # holds (paged); the contiguous allocator reserves each sequence's whole length at admission.
    grows_on_demand: bool

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now."""
        ...

    @property
    def num_host_blocks(self) -> int: ...

    @property
    def seqs(self) -> Mapping[int, SeqBlocks]:
        """Every sequence holding blocks, by id. Read only: audits and the admin views."""
        ...

    # Sizing
    def shared_prompt_blocks(self, prompt_len: int) -> int:
        """Blocks the n sequences of a request share after the fork (0: nothing is shared)."""
        ...

    def peak_blocks(self, prompt_len: int, max_num_tokens: int, n: int) -> int:
        """Blocks a request needs at its largest when it runs alone."""
        ...

    def exclusive_blocks(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's device blocks that no other table holds: what it frees when it ends."""
        ...

    def num_shared(self, blocks: list[int], taken: Mapping[int, int]) -> int:
        """How many of these blocks two or more tables hold, not counting the references in `taken`
        (by block): the end of no one of them frees it."""
        ...

    def will_copy_on_write(self, seq: Sequence) -> bool:
        """Its next write lands in a partly filled block another table shares (the n sequences of a
        request after the fork): it takes a copy of that block first."""
        ...

    # Prefix cache
    def probe(self, seq: Sequence) -> CacheHit: ...

    def match_prefix(self, token_ids: list[int], cache_salt: str | None) -> int: ...

    def cache_computed(self, seq: Sequence, num_tokens: int) -> None: ...

    def completed_hashes(self, seq: Sequence, start: int, end: int) -> list[BlockHash]:
        """The hashes of the full blocks that computing tokens [start, end) of `seq` completes."""
        ...

    def announce_computing(self, step_id: int, seq: Sequence, start: int, end: int) -> None:
        """A planned step computes tokens [start, end) of `seq`: later steps may hit the blocks it completes."""
        ...

    def settle_step(self, step_id: int, failed_seq_ids: set[int]) -> list[int]:
        """A step's output is in; returns the blocks its failed items were to complete."""
        ...

    def evict_cached_free(self) -> int:
        """Forget every cached-free block's content; returns how many were evicted."""
        ...

    def forget_blocks(self, blocks: list[int]) -> list[int]:
        """Drop these blocks' content from the prefix cache: a load into them failed. Returns the
        ones that still cached it: whoever holds them reads content that never arrived."""
        ...

    # Allocation
    def admit(self, seq: Sequence, hit: CacheHit, num_new_tokens: int, reserve_blocks: int, num_children: int = 0) -> bool: ...

    def grow(self, seq: Sequence, num_new_tokens: int) -> list[BlockCopy] | None: ...

    def fork(self, parent: Sequence, child: Sequence) -> list[BlockCopy]: ...

    def share_prefix(self, source: Sequence, seq: Sequence, num_blocks: int) -> None: ...

    def take_table_delta(self, seq: Sequence) -> tuple[int, list[int]]: ...

    def block_table(self, seq_id: int) -> list[int]: ...

    def holds(self, seq: Sequence) -> bool: ...

    def free(self, seq: Sequence) -> None: ...

    # Swapping
    def swap_out(self, seqs: list[Sequence]) -> list[BlockCopy] | None: ...

    def swap_in(self, seqs: list[Sequence], reserve_blocks: int) -> list[BlockCopy] | None: ...

    # Views
    def stats(self) -> PoolStats: ...

    def describe(self, names: Mapping[int, str]) -> list[BlockInfo]:
        """Every block of the device pool in id order; `names` maps seq ids to their holders' names."""
        ...

    def audit(self) -> AccountingReport: ...
