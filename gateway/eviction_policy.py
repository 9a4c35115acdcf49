"""Which cached entry a tier of the prefix cache gives up next: the eviction policies of the page
pool's cached-free blocks (gateway/block_pool.py) and of the host KV store's slots
(gateway/kv_store_index.py). docs/kv-store.md says when each one wins.

A tier tracks its cached entries here by key (a block id, a slot id), with the entry's block hash,
its parent's hash and its depth (index) in the prefix chain; it says which entries are evictable
(pool: cached-free; store: saved and not pinned by a load in flight) and asks for a victim. Every
policy ranks the evictable entries by (priority, recency) and evicts the lowest:

- lru: every priority is 0, so the entry released longest ago goes first (today's pool order).
- lfu: LFU with dynamic aging (LFU-DA): priority L + hits, where L is the priority of the last
  victim. A hot entry stays; popularity that stopped fades, because newcomers start at L and L
  rises with every eviction.
- depth: GreedyDual with the recompute cost as the value: priority L + cost(d), cost(d) = 1 +
  context_cost·d, where d is the block's index in its prefix chain and context_cost is what one
  block of context adds to the cost of computing a block (from the model's shape, given by the
  worker at registration). Deep blocks, dear to recompute, stay longer; L ages out the unused.

Leaf first, in every policy: an entry whose hash has a child tracked in the same tier is evicted
after its children (it is parked until its last child leaves). A prefix chain is only usable up to
its first missing block, so evicting a parent would strand its descendants. Only when every
evictable entry has children does the best parked one go.

A priority is fixed when its entry becomes evictable (released), so a heap with lazy deletion
orders them: O(log n) per release and per eviction.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from paged.gateway.block_hash import BlockHash
from paged.shared.config import EvictionPolicyName

# A stale heap entry stays until it reaches the top; rebuild once they outnumber the live ones.
_COMPACT_SLACK = 64


class EvictionPolicy:
    """The evictable entries of one tier in eviction order; subclasses weigh them."""

    name: EvictionPolicyName
    ages = True  # L rises to each victim's priority

    def __init__(self, capacity: int) -> None:
        self._hash: list[BlockHash | None] = [None] * capacity
        self._parent: list[BlockHash | None] = [None] * capacity
        self._depth = [0] * capacity
        self._hits = [0] * capacity
        self._key_of: dict[BlockHash, int] = {}
        self._children: dict[BlockHash, int] = {}  # hash -> tracked entries whose parent it is
        self._queued: dict[int, tuple[float, int]] = {}  # evictable key -> (priority, tick) of its heap entry
        self._parked: dict[int, tuple[float, int]] = {}  # evictable keys with tracked children, out of the heap
        self._heap: list[tuple[float, int, int]] = []  # (priority, tick, key); entries not in _queued are stale
        self._tick = 0
        self.level = 0.0  # L: the priority of the last victim (aging policies)

    def _weight(self, key: int) -> float:
        raise NotImplementedError

    # The tier's notifications -----------------------------------------------------------------

    def track(self, key: int, block_hash: BlockHash, parent: BlockHash | None, depth: int) -> None:
        """`key` now holds the content of `block_hash` (not evictable yet)."""
        self._hash[key] = block_hash
        self._parent[key] = parent
        self._depth[key] = depth
        self._hits[key] = 1
        self._key_of[block_hash] = key
        if parent is not None:
            self._children[parent] = self._children.get(parent, 0) + 1

    def untrack(self, key: int) -> None:
        """`key`'s content is gone."""
        self.hold(key)
        block_hash, parent = self._hash[key], self._parent[key]
        self._hash[key] = self._parent[key] = None
        if block_hash is not None and self._key_of.get(block_hash) == key:
            del self._key_of[block_hash]
        if parent is None:
            return
        count = self._children[parent] - 1
        if count:
            self._children[parent] = count
            return
        del self._children[parent]
        parent_key = self._key_of.get(parent)
        if parent_key is not None and parent_key in self._parked:  # its last child left: back in line
            entry = self._parked.pop(parent_key)
            self._queued[parent_key] = entry
            heapq.heappush(self._heap, (*entry, parent_key))

    def release(self, key: int) -> None:
        """`key` became evictable (or was used again while evictable): it gets its priority now."""
        self.hold(key)
        self._tick += 1
        entry = (self.level + self._weight(key), self._tick)
        self._queued[key] = entry
        heapq.heappush(self._heap, (*entry, key))
        if len(self._heap) > 2 * len(self._queued) + _COMPACT_SLACK:
            self._heap = [(*entry, queued) for queued, entry in self._queued.items()]
            heapq.heapify(self._heap)

    def hold(self, key: int) -> None:
        """`key` is in use and must not be evicted (a pool block held, a store slot pinned)."""
        if self._queued.pop(key, None) is None:
            self._parked.pop(key, None)

    def hit(self, key: int) -> None:
        """A prefix hit used `key`'s content."""
        self._hits[key] += 1

    def is_evictable(self, key: int) -> bool:
        return key in self._queued or key in self._parked

    def entry(self, key: int) -> tuple[BlockHash | None, BlockHash | None, int]:
        """(hash, parent hash, depth) of a tracked key."""
        return self._hash[key], self._parent[key], self._depth[key]

    # Choosing ------------------------------------------------------------------------------------

    def victim(self) -> int | None:
        """Take the next entry to evict out of the evictable ones (the caller untracks it), or None."""
        heap, queued, children, hashes = self._heap, self._queued, self._children, self._hash
        while heap:
            priority, tick, key = heapq.heappop(heap)
            if queued.get(key) != (priority, tick):
                continue  # stale: held or released again since
            del queued[key]
            if hashes[key] in children:
                self._parked[key] = (priority, tick)
                continue
            return self._chosen(key, priority)
        if self._parked:  # every evictable entry has children: the best of them goes
            key = min(self._parked, key=self._parked.__getitem__)
            return self._chosen(key, self._parked.pop(key)[0])
        return None

    def _chosen(self, key: int, priority: float) -> int:
        if self.ages and priority > self.level:
            self.level = priority
        return key

    @property
    def num_evictable(self) -> int:
        return len(self._queued) + len(self._parked)

    def order(self) -> list[int]:
        """The evictable keys, next victim first as far as leaf-first allows (for views and audits)."""
        ranked = {**self._queued, **self._parked}
        return sorted(ranked, key=lambda key: (self._hash[key] in self._children, *ranked[key]))

    def audit(self, evictable: Iterable[int], tracked: dict[int, BlockHash]) -> list[str]:
        """Problems with this policy's view of a tier: which keys are evictable, which hold what."""
        problems = []
        mine = set(self._queued) | set(self._parked)
        if mine != set(evictable):
            problems.append(f"{self.name}: evictable {sorted(mine)[:8]}..., the tier says {sorted(evictable)[:8]}...")
        held = {key: block_hash for key, block_hash in enumerate(self._hash) if block_hash is not None}
        if held != tracked:
            problems.append(f"{self.name}: tracks {len(held)} entries, the tier holds {len(tracked)}")
        children: dict[BlockHash, int] = {}
        for key in held:
            parent = self._parent[key]
            if parent is not None:
                children[parent] = children.get(parent, 0) + 1
        if children != self._children:
            problems.append(f"{self.name}: child counts disagree with the tracked entries")
        return problems


class LeastRecentlyUsed(EvictionPolicy):
    name = "lru"
    ages = False

    def _weight(self, key: int) -> float:
        return 0.0


class LeastFrequentlyUsed(EvictionPolicy):
    name = "lfu"

    def _weight(self, key: int) -> float:
        return float(self._hits[key])


class RecomputeCost(EvictionPolicy):
    name = "depth"

    def __init__(self, capacity: int, context_cost: float) -> None:
        super().__init__(capacity)
        self.context_cost = context_cost

    def _weight(self, key: int) -> float:
        return 1.0 + self.context_cost * self._depth[key]


def make_policy(name: EvictionPolicyName, capacity: int, context_cost: float = 0.0) -> EvictionPolicy:
    """A policy over keys 0..capacity-1; `context_cost` weighs depth (the depth policy only)."""
    if name == "lru":
        return LeastRecentlyUsed(capacity)
    if name == "lfu":
        return LeastFrequentlyUsed(capacity)
    if name == "depth":
        return RecomputeCost(capacity, context_cost)
    raise ValueError(f"unknown eviction policy {name!r}")
