"""The torch paged-attention path against a naive dense per-sequence reference."""

from __future__ import annotations

import math

import pytest
import torch

from paged.worker.attention.metadata import AttentionMetadata
from support.batch_metadata import batch_metadata
from paged.worker.attention.torch_ops import paged_attention, write_kv

NUM_KV_HEADS = 2
HEAD_DIM = 16


def build_batch(
    context_lens: list[int], query_lens: list[int], block_size: int, num_q_heads: int, shuffle: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, list[tuple]]:
    """Random K/V for every sequence; the cached prefix written beforehand, the new tokens' K/V left to write."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks so that padding entries point at junk
    order = torch.randperm(num_blocks, generator=gen) if shuffle else torch.arange(num_blocks)
    k_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, generator=gen)  # junk everywhere
    v_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    max_blocks = max(blocks_per_seq)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    new_keys, new_values, new_queries, new_slots, per_seq = [], [], [], [], []
    next_block = 0
    for b, (context, seq_len) in enumerate(zip(context_lens, seq_lens)):
        table = order[next_block : next_block + blocks_per_seq[b]]
        next_block += blocks_per_seq[b]
        block_tables[b, : len(table)] = table.int()
        positions = torch.arange(seq_len)
        slots = table[positions // block_size] * block_size + positions % block_size
        keys = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        values = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        queries = torch.randn(seq_len - context, num_q_heads, HEAD_DIM, generator=gen)
        write_kv(keys[:context], values[:context], k_cache, v_cache, slots[:context])
        new_keys.append(keys[context:])
        new_values.append(values[context:])
        new_queries.append(queries)
        new_slots.append(slots[context:])
        per_seq.append((queries, keys, values, context))
    meta = batch_metadata(torch.cat(new_slots), query_lens, seq_lens, block_tables)
    write_kv(torch.cat(new_keys), torch.cat(new_values), k_cache, v_cache, meta.slot_mapping)
    return torch.cat(new_queries), k_cache, v_cache, meta, per_seq


def dense_reference(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context: int, scale: float) -> torch.Tensor:
    """softmax(QK^T)V for one sequence, query i at position context + i, GQA by repeating K/V heads."""
    group = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
    query_pos = context + torch.arange(queries.shape[0])
    allowed = torch.arange(keys.shape[0])[None, :] <= query_pos[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


CASES = {
    "single_prefill": ([0], [37]),
    "ragged_prefills": ([0, 0, 0], [1, 17, 40]),
    "decodes": ([5, 31, 64, 0], [1, 1, 1, 1]),
    "mixed_chunks_and_decodes": ([0, 23, 16, 70, 8], [9, 1, 16, 1, 30]),
}


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_q_heads", [2, 4, 8], ids=lambda h: f"hq{h}")
@pytest.mark.parametrize("shuffle", [False, True], ids=["sequential", "shuffled"])
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_matches_dense(case: str, block_size: int, num_q_heads: int, shuffle: bool) -> None:
    context_lens, query_lens = CASES[case]
    scale = HEAD_DIM**-0.5
    query, k_cache, v_cache, meta, per_seq = build_batch(
        context_lens, query_lens, block_size, num_q_heads, shuffle, seed=block_size * 31 + num_q_heads
    )
    out = paged_attention(query, k_cache, v_cache, meta, scale)
    expected = torch.cat([dense_reference(q, k, v, c, scale) for q, k, v, c in per_seq])
    assert out.shape == query.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_write_kv_places_tokens_at_their_slots() -> None:
    k_cache = torch.zeros(4, 8, NUM_KV_HEADS, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    value = torch.randn(3, NUM_KV_HEADS, HEAD_DIM)
    write_kv(key, value, k_cache, v_cache, torch.tensor([8 * 2 + 5, 0, 8 * 3 + 7]))
    torch.testing.assert_close(k_cache[2, 5], key[0])
    torch.testing.assert_close(k_cache[0, 0], key[1])
    torch.testing.assert_close(v_cache[3, 7], value[2])
    assert k_cache.abs().sum(dim=(-1, -2)).count_nonzero() == 3


def test_backend_selects_torch_ops() -> None:
    from paged.worker.attention import torch_ops
    from paged.worker.attention.backend import get_attention_ops

    assert get_attention_ops("torch") is torch_ops
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_ops("cuda")  # type: ignore[arg-type]
