"""Chained content hashes of full KV blocks, the keys of the prefix cache.

A block's hash covers its parent's hash, its own token ids and, for the first block only, the
request's cache salt: equal hashes therefore mean an equal whole prefix, and tenants with different
salts never share a block. xxh3-128 with a fixed seed makes hashes identical across processes and
restarts (so routing and events agree) while keeping collisions out of reach in practice.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

BlockHash = int

_SEED = 0x5041474544  # "PAGED"
_NO_SALT = bytes(16)


def _first_parent(cache_salt: str | None) -> bytes:
    """The first block's stand-in parent: fixed-length, so salt and token bytes cannot be confused."""
    if not cache_salt:
        return _NO_SALT
    return xxhash.xxh3_128_digest(b"cache_salt:" + cache_salt.encode(), seed=_SEED)


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], cache_salt: str | None) -> BlockHash:
    """The hash of one full block; `cache_salt` is honoured only for the first block (no parent)."""
    prefix = _first_parent(cache_salt) if parent is None else parent.to_bytes(16, "little")
    return xxhash.xxh3_128_intdigest(prefix + array("q", token_ids).tobytes(), seed=_SEED)


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], num_tokens: int, block_size: int, cache_salt: str | None
) -> None:
    """Append to `hashes` the hashes of every full block within token_ids[:num_tokens] not hashed yet."""
    for index in range(len(hashes), num_tokens // block_size):
        parent = hashes[index - 1] if index else None
        start = index * block_size
        hashes.append(hash_block(parent, token_ids[start : start + block_size], cache_salt))
