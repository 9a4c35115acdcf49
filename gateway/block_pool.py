"""The physical KV blocks of one pool: reference counts, the free blocks, and the prefix-cache map.

A block is always exactly one of:
- held: ref_count > 0, in at least one block table;
- cached-free: ref_count == 0 with a content hash, reusable by a prefix hit until evicted;
- free: ref_count == 0 without a hash.

Free blocks are reused first (nothing is lost by reusing them), in an OrderedDict used as an O(1)
queue. Cached-free blocks are reused only when no free block is left, in the order of the pool's
eviction policy (gateway/eviction_policy.py: lru by default, lfu or depth; leaf first, so the tail
of a prefix chain goes before its head). Eviction is lazy: a cached block keeps its hash while it is
free and loses it only when it is taken for reuse; `on_evict` then hears of it, in time for the KV
store tier to save its content (gateway/kv_cache_manager.py). Callers free a table's blocks in
reverse order, so that under lru the tail of a chain is also the least recently freed.

The hashes of the last `num_blocks` blocks evicted for reuse are remembered, so that content asked
for again soon after it was evicted (a refetch: the cache threw out what was about to be used) can
be counted; that share of evictions is what the thrash detector watches (gateway/thrash_detector.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from paged.gateway.block_hash import BlockHash
from paged.gateway.eviction_policy import EvictionPolicy, LeastRecentlyUsed

# (block, its hash, its parent's hash, its depth in the prefix chain): a cached block is being reused.
EvictionHook = Callable[[int, BlockHash, BlockHash | None, int], None]


class BlockPool:
    def __init__(self, num_blocks: int, policy: EvictionPolicy | None = None) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        # Token slots written (or being written this step) in each block; summed over held blocks.
        self.fill = [0] * num_blocks
        self.num_filled_slots = 0
        self.num_cached_free = 0
        self.num_shared = 0  # blocks with ref_count > 1
        self.num_evictions = 0  # cached blocks taken for reuse (a flush or unregister is not one)
        self.num_refetched = 0  # evicted blocks whose content an admission needed again
        self._evicted: OrderedDict[BlockHash, None] = OrderedDict()  # recently evicted, oldest first
        self.cached_since = [0.0] * num_blocks  # monotonic time a cached block became free (its age, for the admin)
        self.on_evict: EvictionHook | None = None
        self.policy = policy or LeastRecentlyUsed(num_blocks)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # free, without a hash
        self._cache: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free plus cached-free."""
        return len(self._free) + self.num_cached_free

    def free_queue(self) -> list[int]:
        """Every block an allocation can take, next to be reused first (for audits, tests and views)."""
        return [*self._free, *self.policy.order()]

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks: free ones first, then cached-free ones by the policy, evicting their content."""
        if count > self.num_free:
            raise ValueError(f"asked for {count} blocks with {self.num_free} free")
        blocks = []
        free = self._free
        for _ in range(count):
            if free:
                block = free.popitem(last=False)[0]
            else:
                block = self.policy.victim()  # type: ignore[assignment]  # not None: num_cached_free > 0
                self._evict(block, notify=True)
            self.ref_counts[block] = 1
            self.fill[block] = 0
            blocks.append(block)
        return blocks

    def _evict(self, block: int, notify: bool) -> None:
        """Drop a cached-free block's content (it is out of the policy's evictable entries already)."""
        block_hash, parent, depth = self.policy.entry(block)
        self.policy.untrack(block)
        self.block_hashes[block] = None
        del self._cache[block_hash]  # type: ignore[arg-type]  # tracked: has a hash
        self.num_cached_free -= 1
        if notify:  # evicted for reuse (not flushed): what the cache threw out, maybe about to be used
            self.num_evictions += 1
            self._remember_eviction(block_hash)  # type: ignore[arg-type]
            if self.on_evict is not None:
                self.on_evict(block, block_hash, parent, depth)  # type: ignore[arg-type]

    def touch(self, blocks: Iterable[int]) -> None:
        """Take one more reference on each block, reviving it if it was free."""
        ref_counts = self.ref_counts
        for block in blocks:
            ref = ref_counts[block]
            if ref == 0:
                self.num_filled_slots += self.fill[block]
                if self.block_hashes[block] is None:
                    del self._free[block]
                else:
                    self.policy.hold(block)
                    self.num_cached_free -= 1
            elif ref == 1:
                self.num_shared += 1
            ref_counts[block] = ref + 1

    def reuse(self, blocks: list[int]) -> None:
        """Take a reference on each block of a prefix hit (the policy counts the hits)."""
        self.touch(blocks)
        hit = self.policy.hit
        for block in blocks:
            hit(block)

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference on each block, in the given order (pass a table reversed)."""
        ref_counts = self.ref_counts
        now = time.monotonic()
        for block in blocks:
            ref = ref_counts[block] - 1
            if ref < 0:
                raise ValueError(f"block {block} freed more often than held")
            ref_counts[block] = ref
            if ref == 1:
                self.num_shared -= 1
            elif ref == 0:
                self.num_filled_slots -= self.fill[block]
                if self.block_hashes[block] is None:
                    self._free[block] = None
                    self._free.move_to_end(block, last=False)
                else:
                    self.policy.release(block)
                    self.num_cached_free += 1
                    self.cached_since[block] = now

    def set_fill(self, block: int, slots: int) -> None:
        """Record how many token slots of a held block hold tokens."""
        self.num_filled_slots += slots - self.fill[block]
        self.fill[block] = slots

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cache.get(block_hash)

    def cached_run(self, block_hashes: Iterable[BlockHash]) -> list[int]:
        """The blocks caching the leading hashes of a chain, up to the first one not cached."""
        blocks = []
        cache = self._cache
        for block_hash in block_hashes:
            block = cache.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def has_room(self, num_new: int, reused: list[int], reserve: int) -> bool:
        """Whether `num_new` fresh blocks and a reference on each of `reused` (prefix hits: the
        cached-free ones among them stop being allocatable) leave `reserve` blocks allocatable."""
        ref_counts = self.ref_counts
        num_revived = sum(1 for block in reused if ref_counts[block] == 0)
        return self.num_free - num_new - num_revived >= reserve

    def register(self, block: int, block_hash: BlockHash, parent: BlockHash | None = None, depth: int = 0) -> None:
        """Make a held, full block findable by its content hash (`parent` is the previous block's in
        its chain, `depth` its index there). A block whose content is already cached elsewhere stays
        unregistered: tables are append-only, so duplicates are not merged."""
        if self.block_hashes[block] is None and block_hash not in self._cache:
            self.block_hashes[block] = block_hash
            self._cache[block_hash] = block
            self.policy.track(block, block_hash, parent, depth)

    def unregister(self, block: int) -> None:
        """Forget a block's content (it cannot be trusted); a cached-free block becomes free."""
        block_hash = self.block_hashes[block]
        if block_hash is None:
            return
        if self.ref_counts[block]:
            self.policy.untrack(block)
            self.block_hashes[block] = None
            del self._cache[block_hash]
            return
        self.policy.hold(block)
        self._evict(block, notify=False)
        self._free[block] = None

    def cached_blocks(self) -> dict[BlockHash, int]:
        """A copy of the hash -> block map (for audits and tests)."""
        return dict(self._cache)

    def _remember_eviction(self, block_hash: BlockHash) -> None:
        evicted = self._evicted
        evicted[block_hash] = None
        if len(evicted) > self.num_blocks:
            evicted.popitem(last=False)

    def count_refetches(self, block_hashes: list[BlockHash]) -> None:
        """A sequence is about to compute these blocks (the ones after its prefix hit): count, once,
        the leading ones whose content was evicted recently."""
        evicted = self._evicted
        for block_hash in block_hashes:
            if block_hash not in evicted:
                return
            del evicted[block_hash]
            self.num_refetched += 1

    def evict_cached_free(self) -> int:
        """Forget the content of every cached-free block (the admin's flush); held blocks keep theirs.
        Returns how many blocks were evicted."""
        evicted = self.policy.order()
        for block in evicted:
            self.policy.hold(block)
            self._evict(block, notify=False)
            self._free[block] = None
            self._free.move_to_end(block, last=False)
        return len(evicted)

    def audit_policy(self) -> list[str]:
        """The eviction policy against the blocks: it tracks the registered ones, cached-free are evictable."""
        tracked = {block: block_hash for block, block_hash in enumerate(self.block_hashes) if block_hash is not None}
        evictable = [block for block in tracked if self.ref_counts[block] == 0]
        return self.policy.audit(evictable, tracked)
