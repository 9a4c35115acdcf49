"""Paged attention in plain torch: the CPU path and the reference the Triton kernels are tested against.

Everything is vectorized over the batch: keys and values are gathered through the block tables into a
padded [B, max_seq_len] view, queries are scattered into a padded [B, max_query_len] view, and one
masked scaled-dot-product-attention call covers prefill chunks and decode tokens alike.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class _PaddedLayout:
    """Where each flattened token sits in the padded [B, max_query_len] query layout, which cache slots
    fill the padded [B, max_seq_len] key layout, and the causal mask between the two."""

    seq_of_token: torch.Tensor  # [T]
    index_in_seq: torch.Tensor  # [T]
    key_blocks: torch.Tensor  # [B * ceil(S / block_size)] the blocks covering each sequence's padded keys
    mask: torch.Tensor  # [B, 1, Q, S]


def _padded_layout(meta: AttentionMetadata, num_tokens: int, block_size: int, device: torch.device) -> _PaddedLayout:
    layout = meta.derived.get("torch")
    if layout is None:
        query_start = meta.query_start_loc.long()
        query_lens = query_start[1:] - query_start[:-1]
        context_lens = meta.seq_lens.long() - query_lens
        # output_size spares a device-to-host sync on CUDA.
        seq_of_token = torch.repeat_interleave(
            torch.arange(meta.num_seqs, device=device), query_lens, output_size=num_tokens
        )
        index_in_seq = torch.arange(num_tokens, device=device) - query_start[seq_of_token]
        positions = torch.arange(meta.max_seq_len, device=device)
        # Query i of sequence b sits at position context_lens[b] + i and sees keys 0..that position.
        # Padding query rows still see key 0, so no row is fully masked (SDPA would produce NaN).
        query_positions = context_lens[:, None] + torch.arange(meta.max_query_len, device=device)  # [B, Q]
        mask = positions[None, None, :] <= query_positions[:, :, None]  # [B, Q, S]
        num_blocks = -(-meta.max_seq_len // block_size)
        key_blocks = meta.block_tables[:, :num_blocks].reshape(-1).long()
        layout = _PaddedLayout(seq_of_token, index_in_seq, key_blocks, mask[:, None])
        meta.derived["torch"] = layout
    return layout


def gather_kv(cache: torch.Tensor, layout: _PaddedLayout, num_seqs: int, max_seq_len: int) -> torch.Tensor:
    """Read positions 0..max_seq_len-1 of every sequence through its block table: [B, max_seq_len, H, D].

    Whole blocks are gathered (one contiguous copy each, much faster than per-position indexing); positions
    past a sequence's length read whatever block the padding points at, and the mask hides them.
    """
    block_size, num_heads, head_dim = cache.shape[1:]
    blocks = cache.index_select(0, layout.key_blocks)  # [B * num_blocks, block_size, H, D]
    return blocks.view(num_seqs, -1, num_heads, head_dim)[:, :max_seq_len]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the new tokens ([T, Hq, D]) over their sequences' cached K/V; returns [T, Hq, D]."""
    layout = _padded_layout(meta, query.shape[0], k_cache.shape[1], query.device)
    padded_query = query.new_zeros(meta.num_seqs, meta.max_query_len, *query.shape[1:])
    padded_query[layout.seq_of_token, layout.index_in_seq] = query
    keys = gather_kv(k_cache, layout, meta.num_seqs, meta.max_seq_len)
    values = gather_kv(v_cache, layout, meta.num_seqs, meta.max_seq_len)
    out = F.scaled_dot_product_attention(
        padded_query.transpose(1, 2),  # [B, Hq, Q, D]
        keys.transpose(1, 2).to(query.dtype),  # [B, Hkv, S, D]
        values.transpose(1, 2).to(query.dtype),
        attn_mask=layout.mask,
        scale=scale,
        enable_gqa=query.shape[1] != k_cache.shape[2],
    )
    return out.transpose(1, 2)[layout.seq_of_token, layout.index_in_seq]
