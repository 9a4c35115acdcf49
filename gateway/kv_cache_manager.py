"""Paged KV allocation: one block table per sequence over a shared BlockPool, with prefix caching,
fork (n > 1) and copy-on-write, and swapping to a host pool.

It implements the BlockAllocator protocol (gateway/block_allocator.py), which the scheduler drives
per sequence; `gateway/contiguous_allocator.py` implements it without paging.

With the host KV store tier (docs/kv-store.md, `store`), the prefix cache has a second tier behind
the pool (gateway/kv_store_tier.py). Blocks held for KV transfers coming in from another worker are
gateway/transfer_holds.py's until the pages are in.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from paged.gateway.block_accounting import AccountingReport, audit_pool
from paged.gateway.block_allocator import BlockInfo, BlockTables, CacheHit, SeqBlocks, hash_prefix, holders_by_block
from paged.gateway.block_hash import BlockHash, extend_block_hashes, hash_block
from paged.gateway.block_pool import BlockPool
from paged.gateway.eviction_policy import make_policy
from paged.gateway.in_flight_blocks import InFlightBlocks
from paged.gateway.kv_store_session import KVStoreSession
from paged.gateway.kv_store_tier import StoreTier
from paged.gateway.request import Sequence
from paged.gateway.stats import PoolStats
from paged.gateway.transfer_holds import TransferHold, TransferHolds
from paged.shared.config import EvictionPolicyName
from paged.shared.protocol import BlockCopy


class KVCacheManager(BlockTables):
    kind = "paged"
    grows_on_demand = True

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        num_host_blocks: int = 0,
        *,
        eviction_policy: EvictionPolicyName = "lru",
        context_cost: float = 0.0,
        store: KVStoreSession | None = None,
    ) -> None:
        """`context_cost` weighs depth in the depth policy (what one block of context adds to computing a block)."""
        super().__init__(block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, make_policy(eviction_policy, num_blocks, context_cost))
        self.host_pool = BlockPool(num_host_blocks)
        self.store_tier = StoreTier(self.pool, store, block_size) if store is not None else None
        self.incoming = TransferHolds(self.pool)  # blocks held for KV transfers from other workers
        self.in_flight = InFlightBlocks()  # full blocks steps in flight complete (gateway/in_flight_blocks.py)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_host_blocks(self) -> int:
        return self.host_pool.num_blocks

    def shared_prompt_blocks(self, prompt_len: int) -> int:
        """Blocks the n sequences of a request share: the full prompt blocks (the fork shares the
        partial one too, until copy-on-write gives each sequence its own)."""
        return prompt_len // self.block_size

    def peak_blocks(self, prompt_len: int, max_num_tokens: int, n: int) -> int:
        """Blocks a request needs at its largest when it runs alone: the full prompt blocks are
        shared by its n sequences, the rest is each sequence's own. The scheduler keeps that sharing
        when it recomputes a preempted request, so this bound holds for its whole life."""
        shared = self.shared_prompt_blocks(prompt_len)
        return shared + n * (self._blocks_for(max_num_tokens) - shared)

    def exclusive_blocks(self, seqs: list[Sequence]) -> list[int]:
        pool = self.pool
        records = self.seqs
        tables = [record.table if (record := records.get(seq.seq_id)) is not None and not record.swapped else [] for seq in seqs]
        if not pool.num_shared:  # nothing shared anywhere: every block is its table's own
            return [len(table) for table in tables]
        ref_counts = pool.ref_counts
        exclusive = []
        for table in tables:
            # A sum of the reference counts equal to the length means no block of it is shared.
            if sum(map(ref_counts.__getitem__, table)) == len(table):
                exclusive.append(len(table))
            else:
                exclusive.append(sum(1 for block in table if ref_counts[block] == 1))
        return exclusive

    def num_shared(self, blocks: list[int], taken: Mapping[int, int]) -> int:
        ref_counts = self.pool.ref_counts
        return sum(1 for block in blocks if ref_counts[block] - taken.get(block, 0) > 1)

    def will_copy_on_write(self, seq: Sequence) -> bool:
        record = self.seqs.get(seq.seq_id)
        if record is None or record.swapped or not record.num_slots % self.block_size:
            return False
        return self.pool.ref_counts[record.table[record.num_slots // self.block_size]] > 1

    # Prefix cache -----------------------------------------------------------------------------

    def probe(self, seq: Sequence) -> CacheHit:
        """The longest chain of cached blocks matching the sequence's known tokens, leaving at least
        one token to compute (its logits are needed): each link from the pool, else from the store;
        without a store, continued by blocks a step in flight completes. No side effects."""
        if not self.enable_prefix_caching:
            return CacheHit()
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        hashes = seq.block_hashes
        if len(hashes) < max_blocks:
            extend_block_hashes(
                hashes, seq.token_ids, max_blocks * self.block_size, self.block_size, seq.request.cache_salt
            )
        if self.store_tier is not None:
            return self.store_tier.probe(hashes, max_blocks)
        blocks = self.pool.cached_run(hashes[:max_blocks])
        if self.in_flight:
            blocks += self.in_flight.extend_hit(hashes, blocks, max_blocks, self.seqs)
        return CacheHit(blocks, len(blocks) * self.block_size)

    def match_prefix(self, token_ids: list[int], cache_salt: str | None) -> int:
        """Tokens of this prompt the cache would serve (for routing); hashes only until the first miss."""
        if not self.enable_prefix_caching:
            return 0
        size = self.block_size
        parent: BlockHash | None = None
        matched = 0
        for start in range(0, (len(token_ids) - 1) // size * size, size):
            parent = hash_block(parent, token_ids[start : start + size], cache_salt)
            if self.pool.lookup(parent) is None and (self.store_tier is None or not self.store_tier.has(parent)):
                break
            matched += size
        return matched

    def num_cached(self, block_hashes: list[BlockHash]) -> int:
        """How many leading blocks of a chain the pool caches (what a transfer here would not send)."""
        return len(self._transfer_hits(block_hashes))

    def _transfer_hits(self, block_hashes: list[BlockHash]) -> list[int]:
        """The leading blocks of a chain a transfer here may skip: cached in the pool with their
        content in. A block whose store load is still in flight is not (nor any after it): the
        load may fail, and nothing would then fail the transfer's request before it decodes from
        that block here; the block travels instead."""
        hits = self.pool.cached_run(block_hashes)
        return self.store_tier.loaded_run(hits) if self.store_tier is not None else hits

    def evict_cached_free(self) -> int:
        return self.pool.evict_cached_free()

    def cache_computed(self, seq: Sequence, num_tokens: int) -> None:
        """Offer to the prefix cache the sequence's full blocks within its first `num_tokens`,
        which the worker has computed and whose ids are all known."""
        record = self.seqs.get(seq.seq_id)
        if record is None or record.swapped or not self.enable_prefix_caching:
            return
        num_full = min(num_tokens, len(seq.token_ids), record.num_slots) // self.block_size
        if num_full <= record.num_registered:
            return
        hashes = seq.block_hashes
        extend_block_hashes(hashes, seq.token_ids, num_full * self.block_size, self.block_size, seq.request.cache_salt)
        for index in range(record.num_registered, num_full):
            self.pool.register(record.table[index], hashes[index], hashes[index - 1] if index else None, index)
        record.num_registered = num_full

    def completed_hashes(self, seq: Sequence, start: int, end: int) -> list[BlockHash]:
        """The hashes of the sequence's full blocks that computing tokens [start, end) completes
        (blocks of known tokens only: a sampled token's id is unknown until its step is back).
        None with a store tier, whose probe does not look at blocks in flight."""
        if not self.enable_prefix_caching or self.store_tier is not None:
            return []
        num_full = min(end, len(seq.token_ids)) // self.block_size
        first = start // self.block_size
        if num_full <= first:
            return []
        hashes = seq.block_hashes
        extend_block_hashes(hashes, seq.token_ids, num_full * self.block_size, self.block_size, seq.request.cache_salt)
        return hashes[first:num_full]

    def announce_computing(self, step_id: int, seq: Sequence, start: int, end: int) -> None:
        """Step `step_id` (planned, not yet run) computes tokens [start, end) of the sequence: later
        steps may take the full blocks it completes as prefix hits (gateway/in_flight_blocks.py)."""
        record = self.seqs.get(seq.seq_id)
        if record is None or record.swapped:
            return
        completed = self.completed_hashes(seq, start, min(end, record.num_slots))
        if completed:
            first = start // self.block_size
            chain = seq.block_hashes[: first + len(completed)]
            self.in_flight.announce(step_id, seq.seq_id, record.table, max(first, record.num_registered), chain)

    def settle_step(self, step_id: int, failed_seq_ids: set[int]) -> list[int]:
        """Step `step_id`'s output is in: its announcements end (the blocks of live sequences join
        the prefix cache proper). Returns the blocks its failed items were to complete."""
        return self.in_flight.step_done(step_id, failed_seq_ids)

    def forget_blocks(self, blocks: list[int]) -> list[int]:
        """Drop these blocks' content from the prefix cache: a load into them failed. Returns the
        ones still caching it (the rest were evicted and taken for new content since)."""
        pool = self.pool
        forgotten = [block for block in blocks if pool.block_hashes[block] is not None]
        for block in forgotten:
            pool.unregister(block)
        return forgotten

    # Allocation ---------------------------------------------------------------------------------

    def admit(self, seq: Sequence, hit: CacheHit, num_new_tokens: int, reserve_blocks: int, num_children: int = 0) -> bool:
        """Give a sequence without blocks its prefix hit plus slots for `num_new_tokens`, if that
        leaves at least `reserve_blocks` free. Children of n > 1 share the table later (fork)."""
        num_slots = hit.num_tokens + num_new_tokens
        num_new_blocks = self._blocks_for(num_slots) - len(hit.blocks)
        if not self.pool.has_room(num_new_blocks, hit.blocks, reserve_blocks):
            return False
        if self.enable_prefix_caching:
            self.pool.count_refetches(seq.block_hashes[hit.num_tokens // self.block_size :])
        self.pool.reuse(hit.blocks)
        if hit.store_hits:
            assert self.store_tier is not None  # store hits come from it
            table = self.store_tier.load(hit, seq.block_hashes, num_new_blocks)
        else:
            table = hit.blocks + self.pool.allocate(num_new_blocks)
        record = SeqBlocks(table, hit.num_tokens, num_registered=hit.num_tokens // self.block_size)
        self.seqs[seq.seq_id] = record
        self._fill(record, num_slots)
        return True

    def grow(self, seq: Sequence, num_new_tokens: int) -> list[BlockCopy] | None:
        """Slots for the sequence's next `num_new_tokens` tokens. Returns the copy-on-write copies
        the worker must make first, or None (nothing changed) when the pool is short."""
        record = self.seqs[seq.seq_id]
        start = record.num_slots
        end = start + num_new_tokens
        table = record.table
        size = self.block_size
        pool = self.pool
        offset = start % size
        if offset and offset + num_new_tokens <= size:
            # The decode fast path: the tokens land in the last block, which is partly filled.
            block = table[-1]
            if pool.ref_counts[block] == 1:
                pool.fill[block] += num_new_tokens
                pool.num_filled_slots += num_new_tokens
                record.num_slots = end
                return []
        num_new_blocks = -(-end // size) - len(table)
        shared_index = start // size
        # Writing into a partially filled block another table shares (n > 1 after the fork).
        copy_on_write = start % size != 0 and pool.ref_counts[table[shared_index]] > 1
        if max(num_new_blocks, 0) + copy_on_write > pool.num_free:
            return None
        copies: list[BlockCopy] = []
        if copy_on_write:
            src = table[shared_index]
            (dst,) = pool.allocate(1)
            pool.set_fill(dst, pool.fill[src])
            pool.free((src,))
            table[shared_index] = dst
            record.num_sent = min(record.num_sent, shared_index)
            copies.append(BlockCopy(src, dst))
        if num_new_blocks > 0:
            table.extend(pool.allocate(num_new_blocks))
        self._fill(record, end)
        return copies

    def _fill(self, record: SeqBlocks, end: int) -> None:
        """Mark slots [record.num_slots, end) as holding tokens."""
        size = self.block_size
        table = record.table
        set_fill = self.pool.set_fill
        for index in range(record.num_slots // size, -(-end // size)):
            set_fill(table[index], min(size, end - index * size))
        record.num_slots = end

    def fork(self, parent: Sequence, child: Sequence) -> list[BlockCopy]:
        """The child shares the parent's whole table (the worker copies the parent's): no copies
        now; a shared partial block is copied when first written (grow)."""
        record = self.seqs[parent.seq_id]
        self.pool.touch(record.table)
        self.seqs[child.seq_id] = SeqBlocks(
            list(record.table), record.num_slots, len(record.table), record.num_registered
        )
        child.block_hashes = list(parent.block_hashes)
        return []

    def share_prefix(self, source: Sequence, seq: Sequence, num_blocks: int) -> None:
        """Give a sequence without blocks the first `num_blocks` (full, computed) blocks of another's
        table: how the sequences of a recomputed n > 1 request share their prompt again."""
        source_record = self.seqs[source.seq_id]
        table = source_record.table[:num_blocks]
        self.pool.touch(table)
        num_registered = min(source_record.num_registered, num_blocks)
        self.seqs[seq.seq_id] = SeqBlocks(table, num_blocks * self.block_size, num_registered=num_registered)

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks (device or host), tail first so the tail is evicted first."""
        record = self.seqs.pop(seq.seq_id, None)
        if record is not None:
            (self.host_pool if record.swapped else self.pool).free(reversed(record.table))

    # Swapping -----------------------------------------------------------------------------------

    def swap_out(self, seqs: list[Sequence]) -> list[BlockCopy] | None:
        """Move a group's blocks to the host pool (shared blocks once). None if the host pool is short."""
        return self._move(seqs, self.pool, self.host_pool, 0, swapped=True)

    def swap_in(self, seqs: list[Sequence], reserve_blocks: int) -> list[BlockCopy] | None:
        """Bring a swapped group back, if that leaves `reserve_blocks` free. None otherwise."""
        copies = self._move(seqs, self.host_pool, self.pool, reserve_blocks, swapped=False)
        if copies is not None:
            for seq in seqs:
                record = self.seqs[seq.seq_id]
                record.num_sent = 0
                record.num_registered = 0
                slots, record.num_slots = record.num_slots, 0
                self._fill(record, slots)
                self.cache_computed(seq, slots)
        return copies

    def _move(
        self, seqs: list[Sequence], src_pool: BlockPool, dst_pool: BlockPool, reserve: int, swapped: bool
    ) -> list[BlockCopy] | None:
        records = [self.seqs[seq.seq_id] for seq in seqs]
        unique = list(dict.fromkeys(block for record in records for block in record.table))
        if dst_pool.num_free - len(unique) < reserve:
            return None
        mapping = dict(zip(unique, dst_pool.allocate(len(unique)), strict=True))
        for record in records:
            new_table = [mapping[block] for block in record.table]
            src_pool.free(reversed(record.table))
            record.table = new_table
            record.swapped = swapped
        # Each destination block was allocated once; take one reference per extra holder.
        extra = [block for record in records for block in record.table]
        counts: dict[int, int] = {}
        for block in extra:
            counts[block] = counts.get(block, 0) + 1
        for block, count in counts.items():
            dst_pool.touch([block] * (count - 1))
        return [BlockCopy(src, dst) for src, dst in mapping.items()]

    # Incoming KV transfers -----------------------------------------------------------------------

    def hold_for_transfer(
        self, transfer_id: int, block_hashes: list[BlockHash], num_blocks: int, reserve_blocks: int
    ) -> TransferHold | None:
        """Hold a table of `num_blocks` for a sequence whose KV another worker sends: the leading
        blocks this pool already caches (`block_hashes`: the full ones' hashes; at least the last
        block always travels), then fresh blocks for the rest, if that leaves `reserve_blocks` free.
        Nothing is registered in the prefix cache until the pages are in (adopt_transfer)."""
        hits = self._transfer_hits(block_hashes[: num_blocks - 1]) if self.enable_prefix_caching else []
        return self.incoming.hold(transfer_id, hits, num_blocks - len(hits), reserve_blocks)

    def adopt_transfer(self, transfer_id: int, seqs: list[Sequence], num_slots: int) -> None:
        """The pages are in: the held table becomes the block table of each of `seqs` (n > 1 share
        it, copy-on-write as after a fork), holding `num_slots` computed tokens; the worker learns
        the whole table with each sequence's first step. Its full blocks join the prefix cache."""
        hold = self.incoming.take(transfer_id)
        self.pool.touch(hold.table * (len(seqs) - 1))
        for seq in seqs:
            self.seqs[seq.seq_id] = SeqBlocks(list(hold.table), 0, num_registered=hold.num_hits)
            self._fill(self.seqs[seq.seq_id], num_slots)
        self.cache_computed(seqs[0], num_slots)

    # Views ------------------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        pool = self.pool
        used = pool.num_blocks - pool.num_free
        return PoolStats(
            num_blocks=pool.num_blocks,
            block_size=self.block_size,
            free_blocks=pool.num_free - pool.num_cached_free,
            cached_blocks=pool.num_cached_free,
            used_blocks=used,
            shared_blocks=pool.num_shared,
            slots_reserved=used * self.block_size,
            slots_filled=pool.num_filled_slots,
            evictions=pool.num_evictions,
            refetched_blocks=pool.num_refetched,
            host_blocks=self.host_pool.num_blocks,
            host_free_blocks=self.host_pool.num_free,
        )

    def describe(self, names: Mapping[int, str]) -> list[BlockInfo]:
        pool = self.pool
        holders = holders_by_block(self.seqs, names)
        self.incoming.name_holders(holders)
        lru = {block: rank for rank, block in enumerate(pool.free_queue()) if pool.block_hashes[block] is not None}
        now = time.monotonic()
        blocks = []
        for block in range(pool.num_blocks):
            ref = pool.ref_counts[block]
            block_hash = hash_prefix(pool.block_hashes[block])
            if ref:
                blocks.append(BlockInfo(block, "held", ref, pool.fill[block], holders.get(block, []), block_hash))
            elif block_hash is not None:
                blocks.append(BlockInfo(block, "cached", hash=block_hash, lru=lru[block], age_s=now - pool.cached_since[block]))
            else:
                blocks.append(BlockInfo(block, "free"))
        return blocks

    def audit(self) -> AccountingReport:
        report = AccountingReport()
        device = [record.table for record in self.seqs.values() if not record.swapped]
        device += self.incoming.tables()
        host = [record.table for record in self.seqs.values() if record.swapped]
        audit_pool(self.pool, device, report, "device")
        host_report = AccountingReport()
        audit_pool(self.host_pool, host, host_report, "host", count_fill=False)
        report.problems += host_report.problems
        for seq_id, record in self.seqs.items():
            if len(record.table) != -(-record.num_slots // self.block_size):
                report.problems.append(f"seq {seq_id}: {len(record.table)} blocks for {record.num_slots} slots")
        return report
