"""Paged test batches: sequences with cached prefixes and new tokens scattered over a shuffled pool of
physical blocks, plus attention computed naively over the dense, never-paged K/V to check kernels against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from paged.worker.attention import torch_ops
from paged.worker.attention.metadata import AttentionMetadata
from support.batch_metadata import batch_metadata

WriteKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


@dataclass
class PagedBatch:
    query: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    dense_keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D], in order of position
    dense_values: list[torch.Tensor]
    scale: float


def make_batch(
    context_lens: list[int],
    query_lens: list[int],
    *,
    num_q_heads: int = 8,
    num_kv_heads: int = 4,
    head_dim: int = 8,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    write_kv: WriteKV = torch_ops.write_kv,
    shares: dict[int, tuple[int, int]] | None = None,
) -> PagedBatch:
    """Sequences with cached prefixes (written by plain indexing) and new tokens written by `write_kv`
    (the kernel under test, when it has one).

    shares[b] = (a, n): sequence b's first n blocks are sequence a's (a < b), the same physical blocks
    holding the same keys, as the gateway's prefix cache hands them out. Both must hold tokens in all n
    blocks, and b's cached prefix must cover them (b never writes into a shared block)."""
    shares = shares or {}
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few spare blocks that nobody owns
    # Shuffled physical blocks, so no sequence's table is contiguous or ordered.
    physical = torch.randperm(num_blocks, generator=generator)
    max_blocks = max(max(blocks_per_seq), 1)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)

    dense_keys, dense_values, new_keys, new_values, slots = [], [], [], [], []
    next_block = 0
    tables: list[torch.Tensor] = []
    for b, (context_len, seq_len) in enumerate(zip(context_lens, seq_lens)):
        keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(dtype)
        values = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(dtype)
        owner, num_shared = shares.get(b, (b, 0))
        shared_len = num_shared * block_size
        if num_shared:
            if not (owner < b and shared_len <= min(context_len, seq_lens[owner])):
                raise ValueError(f"sequence {b} cannot share {num_shared} blocks of sequence {owner}")
            keys[:shared_len] = dense_keys[owner][:shared_len]
            values[:shared_len] = dense_values[owner][:shared_len]
        own = physical[next_block : next_block + blocks_per_seq[b] - num_shared]
        next_block += len(own)
        table = torch.cat([tables[owner][:num_shared], own]) if num_shared else own
        tables.append(table)
        block_tables[b, : len(table)] = table.int()
        positions = torch.arange(seq_len)
        seq_slots = table[positions // block_size] * block_size + positions % block_size
        # The cached prefix goes in by plain indexing; the new tokens go through the kernel under test.
        k_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:context_len]] = keys[:context_len]
        v_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:context_len]] = values[:context_len]
        dense_keys.append(keys)
        dense_values.append(values)
        new_keys.append(keys[context_len:])
        new_values.append(values[context_len:])
        slots.append(seq_slots[context_len:])

    slot_mapping = torch.cat(slots).long()
    write_kv(torch.cat(new_keys), torch.cat(new_values), k_cache, v_cache, slot_mapping)
    meta = batch_metadata(slot_mapping, query_lens, seq_lens, block_tables)
    query = torch.randn(sum(query_lens), num_q_heads, head_dim, generator=generator).to(dtype)
    return PagedBatch(query, k_cache, v_cache, meta, dense_keys, dense_values, head_dim**-0.5)


def dense_reference(batch: PagedBatch) -> torch.Tensor:
    """Attention in fp64 over the dense K/V, one sequence at a time: obviously right, deliberately naive."""
    out = torch.zeros(batch.query.shape, dtype=torch.float64)
    starts = batch.meta.query_start_loc.tolist()
    for b, (keys, values) in enumerate(zip(batch.dense_keys, batch.dense_values)):
        query = batch.query[starts[b] : starts[b + 1]].double()  # [Q, Hq, D]
        num_queries, num_q_heads = query.shape[:2]
        if num_queries == 0:
            continue
        group = num_q_heads // keys.shape[1]
        keys = keys.double().repeat_interleave(group, dim=1)  # [S, Hq, D]
        values = values.double().repeat_interleave(group, dim=1)
        context_len = keys.shape[0] - num_queries
        scores = torch.einsum("qhd,khd->hqk", query, keys) * batch.scale
        query_positions = context_len + torch.arange(num_queries)
        visible = torch.arange(keys.shape[0])[None, :] <= query_positions[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[starts[b] : starts[b + 1]] = torch.einsum("hqk,khd->qhd", probs, values)
    return out


def assert_close_to_reference(batch: PagedBatch, out: torch.Tensor) -> None:
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    torch.testing.assert_close(out.double(), dense_reference(batch), **TOLERANCES[batch.query.dtype])


def chunk_of(whole: PagedBatch, start: int, end: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """Queries start..end-1 of a single-sequence batch as one prefill chunk over the cached positions
    before it (the whole prompt's K/V is already in the pages): what a chunked prefill step sends."""
    meta = whole.meta
    chunk_meta = AttentionMetadata(
        slot_mapping=meta.slot_mapping[start:end],
        query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
        seq_lens=torch.tensor([end], dtype=torch.int32),
        block_tables=meta.block_tables,
        max_query_len=end - start,
        max_seq_len=end,
    )
    return whole.query[start:end], chunk_meta
