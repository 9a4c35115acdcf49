"""Paged attention in plain torch: the CPU path and the reference the Triton kernels are tested against.

Everything is vectorized over the batch: keys and values are gathered through the block tables into a
padded [B, max_seq_len] view, queries are scattered into a padded [B, max_query_len] view, and one
masked scaled-dot-product-attention call covers prefill chunks and decode tokens alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.attention.metadata import AttentionMetadata


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the new tokens' K/V ([T, Hkv, D]) at their slots (block_id * block_size + offset), in place."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    # A contiguous [num_blocks, block_size, H, D] cache viewed as [slots, H, D] shares its storage.
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int) -> torch.Tensor:
    """Read positions 0..max_seq_len-1 of every sequence through its block table: [B, max_seq_len, H, D].

    Whole blocks are gathered (one contiguous copy each, much faster than per-position indexing); positions
    past a sequence's length read whatever block the padding points at, and the mask hides them.
    """
    num_seqs = block_tables.shape[0]
    block_size, num_heads, head_dim = cache.shape[1:]
    num_blocks = -(-max_seq_len // block_size)
    block_ids = block_tables[:, :num_blocks].reshape(-1).long()
    blocks = cache.index_select(0, block_ids)  # [B * num_blocks, block_size, H, D]
    return blocks.view(num_seqs, num_blocks * block_size, num_heads, head_dim)[:, :max_seq_len]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the new tokens ([T, Hq, D]) over their sequences' cached K/V; returns [T, Hq, D]."""
    num_seqs = meta.num_seqs
    device = query.device
    query_start = meta.query_start_loc.long()
    query_lens = query_start[1:] - query_start[:-1]
    context_lens = meta.seq_lens.long() - query_lens

    # Where each flattened token sits in the padded [B, max_query_len] layout.
    # output_size spares a device-to-host sync on CUDA.
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), query_lens, output_size=query.shape[0])
    index_in_seq = torch.arange(query.shape[0], device=device) - query_start[seq_of_token]

    padded_query = query.new_zeros(num_seqs, meta.max_query_len, *query.shape[1:])
    padded_query[seq_of_token, index_in_seq] = query

    keys = gather_kv(k_cache, meta.block_tables, meta.max_seq_len)
    values = gather_kv(v_cache, meta.block_tables, meta.max_seq_len)

    # Query i of sequence b sits at position context_lens[b] + i and sees keys 0..that position. Padding
    # query rows still see key 0, so no row is fully masked (which would make SDPA produce NaN).
    query_positions = context_lens[:, None] + torch.arange(meta.max_query_len, device=device)  # [B, Q]
    key_positions = torch.arange(meta.max_seq_len, device=device)  # [S]
    mask = key_positions[None, None, :] <= query_positions[:, :, None]  # [B, Q, S]

    out = F.scaled_dot_product_attention(
        padded_query.transpose(1, 2),  # [B, Hq, Q, D]
        keys.transpose(1, 2).to(query.dtype),  # [B, Hkv, S, D]
        values.transpose(1, 2).to(query.dtype),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=query.shape[1] != k_cache.shape[2],
    )
    return out.transpose(1, 2)[seq_of_token, index_in_seq]
