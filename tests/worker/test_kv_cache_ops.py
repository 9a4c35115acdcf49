"""The page pool's block copies and swaps move whole pages, in every layer, K and V, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paged.shared.protocol import BlockCopy
from paged.worker.builtin_model import BUILTIN_ARCH
from paged.worker.kv_cache import KVCache, bytes_per_block, num_blocks_for_budget

ARCH = dataclasses.replace(BUILTIN_ARCH, num_layers=3, num_kv_heads=2, head_dim=4)
NUM_BLOCKS, NUM_HOST_BLOCKS, BLOCK_SIZE = 24, 10, 4


def random_cache(seed: int = 0) -> KVCache:
    cache = KVCache(ARCH, NUM_BLOCKS, BLOCK_SIZE, torch.float32, torch.device("cpu"), NUM_HOST_BLOCKS)
    cache.device_pool.copy_(torch.randn(cache.device_pool.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def pages(pool: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """Every layer's K and V pages for `block_ids`: [layers, 2, len(block_ids), block_size, H, D]."""
    return pool[:, :, block_ids].clone()


def test_layout_and_sizes() -> None:
    cache = random_cache()
    assert len(cache.kv_caches) == ARCH.num_layers
    for layer, (k_cache, v_cache) in enumerate(cache.kv_caches):
        assert k_cache.shape == (NUM_BLOCKS, BLOCK_SIZE, ARCH.num_kv_heads, ARCH.head_dim)
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        # Views, not copies: what the model writes is what copies and swaps move.
        assert k_cache.data_ptr() == cache.device_pool[layer, 0].data_ptr()
        assert v_cache.data_ptr() == cache.device_pool[layer, 1].data_ptr()
    per_block = bytes_per_block(ARCH, BLOCK_SIZE, torch.float32)
    assert per_block == cache.device_pool.nbytes // NUM_BLOCKS
    assert bytes_per_block(ARCH, BLOCK_SIZE, torch.bfloat16) == per_block // 2
    assert num_blocks_for_budget(10 * per_block + per_block - 1, ARCH, BLOCK_SIZE, torch.float32) == 10
    assert num_blocks_for_budget(-5, ARCH, BLOCK_SIZE, torch.float32) == 0


def test_copy_blocks_copies_every_layer_and_nothing_else() -> None:
    cache = random_cache()
    before = cache.device_pool.clone()
    src, dst = [3, 17, 0], [9, 2, 23]  # non-contiguous, unordered
    cache.copy_blocks([BlockCopy(s, d) for s, d in zip(src, dst)])
    assert torch.equal(pages(cache.device_pool, dst), pages(before, src))
    untouched = [b for b in range(NUM_BLOCKS) if b not in dst]
    assert torch.equal(pages(cache.device_pool, untouched), pages(before, untouched))


def test_copy_reads_all_sources_before_writing() -> None:
    """A chain a->b, b->c moves the old b into c, not the new one."""
    cache = random_cache()
    before = cache.device_pool.clone()
    cache.copy_blocks([BlockCopy(1, 5), BlockCopy(5, 7)])
    assert torch.equal(pages(cache.device_pool, [5, 7]), pages(before, [1, 5]))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_swap_out_then_in_restores_pages(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, NUM_HOST_BLOCKS), label="count")
    device_ids = data.draw(st.permutations(range(NUM_BLOCKS)), label="device_ids")[:count]
    host_ids = data.draw(st.permutations(range(NUM_HOST_BLOCKS)), label="host_ids")[:count]
    back_ids = data.draw(st.permutations(range(NUM_BLOCKS)), label="back_ids")[:count]
    cache = random_cache(seed=count)
    original = pages(cache.device_pool, device_ids)

    cache.swap_out([BlockCopy(d, h) for d, h in zip(device_ids, host_ids)])
    cache.device_pool.normal_()  # the pages are reused by others while swapped out
    others = [b for b in range(NUM_BLOCKS) if b not in back_ids]
    others_before = pages(cache.device_pool, others)
    cache.swap_in([BlockCopy(h, d) for h, d in zip(host_ids, back_ids)])

    assert torch.equal(pages(cache.device_pool, back_ids), original)
    assert torch.equal(pages(cache.device_pool, others), others_before)


def test_copy_then_copy_back_round_trip() -> None:
    cache = random_cache()
    before = cache.device_pool.clone()
    cache.copy_blocks([BlockCopy(4, 20), BlockCopy(11, 13)])
    cache.device_pool[:, :, [4, 11]] = 0.0
    cache.copy_blocks([BlockCopy(20, 4), BlockCopy(13, 11)])
    assert torch.equal(pages(cache.device_pool, [4, 11]), pages(before, [4, 11]))


@pytest.mark.parametrize(
    ("operation", "copy"),
    [
        ("copy_blocks", BlockCopy(0, NUM_BLOCKS)),
        ("swap_out", BlockCopy(0, NUM_HOST_BLOCKS)),
        ("swap_in", BlockCopy(NUM_HOST_BLOCKS, 0)),
        ("swap_in", BlockCopy(-1, 0)),
    ],
)
def test_out_of_range_block_ids_are_rejected_untouched(operation: str, copy: BlockCopy) -> None:
    cache = random_cache()
    before = cache.device_pool.clone()
    with pytest.raises(IndexError, match="out of range"):
        getattr(cache, operation)([BlockCopy(1, 2), copy])
    assert torch.equal(cache.device_pool, before)
