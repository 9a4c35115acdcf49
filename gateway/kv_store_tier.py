"""The host KV store as the second tier of a paged pool's prefix cache (docs/kv-store.md), for one
worker session.

A cached block the pool reuses has its content saved to the store in the same step (the pool's
eviction hook); the prefix probe looks in the pool, then the store, for each link of the chain; a
link only the store has is loaded into a new block in the admitting step, and that block joins the
pool's prefix map at once (the worker loads it before any forward pass that reads it). The session
(gateway/kv_store_session.py) puts the saves and loads into the step.
"""

from __future__ import annotations

from paged.gateway.block_allocator import CacheHit
from paged.gateway.block_hash import BlockHash
from paged.gateway.block_pool import BlockPool
from paged.gateway.kv_store_session import KVStoreSession


class StoreTier:
    def __init__(self, pool: BlockPool, session: KVStoreSession, block_size: int) -> None:
        self._pool = pool
        self._session = session
        self._block_size = block_size
        pool.on_evict = session.save

    def has(self, block_hash: BlockHash) -> bool:
        return self._session.lookup(block_hash) is not None

    def probe(self, hashes: list[BlockHash], max_blocks: int) -> CacheHit:
        """The longest chain matching the first `max_blocks` hashes, each link from the pool, else from the store."""
        lookup = self._pool.lookup
        store_lookup = self._session.lookup
        blocks = []
        store_hits = []
        for index in range(max_blocks):
            block = lookup(hashes[index])
            if block is not None:
                blocks.append(block)
                continue
            slot = store_lookup(hashes[index])
            if slot is None:
                break
            store_hits.append((index, slot))
        num_tokens = (len(blocks) + len(store_hits)) * self._block_size
        return CacheHit(blocks, num_tokens, store_hits, max_blocks * self._block_size - num_tokens)

    def load(self, hit: CacheHit, hashes: list[BlockHash], num_new_blocks: int) -> list[int]:
        """The table of an admitted sequence whose chain the store partly holds (`hashes`: its
        chain's): `num_new_blocks` new blocks, of which each store link takes one, loaded in this
        step and findable in the pool at once; the pool's hits are taken already."""
        session = self._session
        pool = self._pool
        for _, slot in hit.store_hits:  # pinned first: the evictions of the allocation below save into the store
            session.pin(slot)
        fresh = iter(pool.allocate(num_new_blocks))
        pooled = iter(hit.blocks)
        from_store = dict(hit.store_hits)
        table = []
        for index in range(len(hit.blocks) + len(hit.store_hits)):
            slot = from_store.get(index)
            if slot is None:
                table.append(next(pooled))
                continue
            block = next(fresh)
            session.load(slot, block)
            pool.register(block, hashes[index], hashes[index - 1] if index else None, index)
            table.append(block)
        table.extend(fresh)
        return table

    def loaded_run(self, blocks: list[int]) -> list[int]:
        """The leading `blocks` whose content is in the pool: up to the first one a load not yet
        confirmed fills."""
        loading = self._session.loading_blocks()
        if not loading:
            return blocks
        end = next((index for index, block in enumerate(blocks) if block in loading), len(blocks))
        return blocks[:end]
