"""The physical KV blocks of one pool: reference counts, an LRU free queue and the prefix-cache map.

A block is always exactly one of:
- held: ref_count > 0, in at least one block table;
- cached-free: ref_count == 0 with a content hash, in the free queue and reusable by a prefix hit;
- free: ref_count == 0 without a hash, in the free queue.

The free queue is an OrderedDict used as an O(1) doubly-linked list: the front is reused first.
Blocks without a hash go to the front (nothing is lost by reusing them), hashed blocks to the back,
so cached content is evicted least-recently-freed first. Eviction is lazy: a cached block keeps its
hash in the free queue and loses it only when it is popped for reuse. Callers free a table's blocks
in reverse order so that the tail of a prefix chain is evicted before its head.

The hashes of the last `num_blocks` blocks evicted for reuse are remembered, so that content asked
for again soon after it was evicted (a refetch: the cache threw out what was about to be used) can
be counted; that share of evictions is what the thrash detector watches (gateway/thrash_detector.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable

from paged.gateway.block_hash import BlockHash


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        # Token slots written (or being written this step) in each block; summed over held blocks.
        self.fill = [0] * num_blocks
        self.num_filled_slots = 0
        self.num_cached_free = 0
        self.num_shared = 0  # blocks with ref_count > 1
        self.num_evictions = 0
        self.num_refetched = 0  # evicted blocks whose content an admission needed again
        self._evicted: OrderedDict[BlockHash, None] = OrderedDict()  # recently evicted, oldest first
        self.cached_since = [0.0] * num_blocks  # monotonic time a cached block became free (its age, for the admin)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cache: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: free plus cached-free."""
        return len(self._free)

    def free_queue(self) -> list[int]:
        """The free queue, next to be reused first (for audits and tests)."""
        return list(self._free)

    def allocate(self, count: int) -> list[int]:
        """Pop `count` blocks off the front of the free queue, evicting any cached content."""
        if count > len(self._free):
            raise ValueError(f"asked for {count} blocks with {len(self._free)} free")
        blocks = []
        popitem = self._free.popitem
        for _ in range(count):
            block, _ = popitem(last=False)
            block_hash = self.block_hashes[block]
            if block_hash is not None:
                self.block_hashes[block] = None
                if self._cache.get(block_hash) == block:
                    del self._cache[block_hash]
                self.num_cached_free -= 1
                self.num_evictions += 1
                self._remember_eviction(block_hash)
            self.ref_counts[block] = 1
            self.fill[block] = 0
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """Take one more reference on each block, reviving it from the free queue if it was free."""
        ref_counts = self.ref_counts
        for block in blocks:
            ref = ref_counts[block]
            if ref == 0:
                del self._free[block]
                self.num_filled_slots += self.fill[block]
                if self.block_hashes[block] is not None:
                    self.num_cached_free -= 1
            elif ref == 1:
                self.num_shared += 1
            ref_counts[block] = ref + 1

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
                self._free[block] = None
                if self.block_hashes[block] is None:
                    self._free.move_to_end(block, last=False)
                else:
                    self.num_cached_free += 1
                    self.cached_since[block] = now

    def set_fill(self, block: int, slots: int) -> None:
        """Record how many token slots of a held block hold tokens."""
        self.num_filled_slots += slots - self.fill[block]
        self.fill[block] = slots

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cache.get(block_hash)

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Make a held, full block findable by its content hash. A block whose content is already
        cached elsewhere stays unregistered: tables are append-only, so duplicates are not merged."""
        if self.block_hashes[block] is None and block_hash not in self._cache:
            self.block_hashes[block] = block_hash
            self._cache[block_hash] = block

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
        evicted = [(block, self.block_hashes[block]) for block in self._free if self.block_hashes[block] is not None]
        for block, block_hash in evicted:
            self.block_hashes[block] = None
            if self._cache.get(block_hash) == block:  # type: ignore[arg-type]  # not None: filtered above
                del self._cache[block_hash]  # type: ignore[arg-type]
            self._free.move_to_end(block, last=False)
        self.num_cached_free -= len(evicted)
        self.num_evictions += len(evicted)
        return len(evicted)
