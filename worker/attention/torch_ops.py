"""Paged attention in plain torch: the CPU path and the reference the Triton kernels are tested against.

Everything is vectorized over the batch: keys and values are gathered through the block tables into a
padded [B, max_seq_len] view, queries are scattered into a padded [B, max_query_len] view, and a
masked scaled-dot-product-attention call covers them. Decode rows and prefill chunks are two such
calls, so that a batch mixing both does not pad every decode row to the longest chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from paged.worker.attention.metadata import AttentionMetadata


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
class _PaddedGroup:
    """Sequences attended together in one padded SDPA call: where their flattened tokens sit in the
    padded [B, max_query_len] query layout, which blocks fill the padded [B, max_seq_len] key layout,
    and the causal mask between the two."""

    tokens: torch.Tensor  # [Tg] indices into the flattened batch
    seq_of_token: torch.Tensor  # [Tg] row in the group
    index_in_seq: torch.Tensor  # [Tg] column in the group's padded query layout
    key_blocks: torch.Tensor  # [Bg * ceil(Sg / block_size)] the blocks covering each row's padded keys
    mask: torch.Tensor  # [Bg, 1, Qg, Sg]
    num_seqs: int
    max_seq_len: int


def _group(
    seqs: torch.Tensor, meta: AttentionMetadata, query_lens: torch.Tensor, block_size: int
) -> _PaddedGroup:
    """The padded layout of the sequences `seqs` (indices into the batch)."""
    device = seqs.device
    query_start = meta.query_start_loc.long()[seqs]
    group_query_lens = query_lens[seqs]
    seq_lens = meta.seq_lens.long()[seqs]
    context_lens = seq_lens - group_query_lens
    max_query_len = int(group_query_lens.max())
    max_seq_len = int(seq_lens.max())
    num_tokens = int(group_query_lens.sum())
    seq_of_token = torch.repeat_interleave(torch.arange(len(seqs), device=device), group_query_lens, output_size=num_tokens)
    group_start = torch.cumsum(group_query_lens, 0) - group_query_lens
    index_in_seq = torch.arange(num_tokens, device=device) - group_start[seq_of_token]
    tokens = query_start[seq_of_token] + index_in_seq
    positions = torch.arange(max_seq_len, device=device)
    # Query i of a sequence sits at position context_len + i and sees keys 0..that position. Padding
    # query rows still see key 0, so no row is fully masked (SDPA would produce NaN).
    query_positions = context_lens[:, None] + torch.arange(max_query_len, device=device)  # [Bg, Qg]
    mask = positions[None, None, :] <= query_positions[:, :, None]  # [Bg, Qg, Sg]
    num_blocks = -(-max_seq_len // block_size)
    key_blocks = meta.block_tables[seqs, :num_blocks].reshape(-1).long()
    return _PaddedGroup(tokens, seq_of_token, index_in_seq, key_blocks, mask[:, None], len(seqs), max_seq_len)


def _groups(meta: AttentionMetadata, block_size: int) -> list[_PaddedGroup]:
    """Decode rows (one new token) and prefill chunks, padded separately: padding a mixed batch as
    one would stretch every decode row to the longest chunk's query length. Built once per forward
    pass (the first layer) and reused by every layer. The group sizes are read back to the host,
    which is free on the CPU this path serves."""
    groups = meta.derived.get("torch")
    if groups is None:
        query_lens = meta.query_lens.long()
        single = query_lens == 1
        groups = [
            _group(seqs, meta, query_lens, block_size)
            for seqs in (torch.nonzero(single).flatten(), torch.nonzero(~single & (query_lens > 0)).flatten())
            if len(seqs)
        ]
        meta.derived["torch"] = groups
    return groups


def gather_kv(cache: torch.Tensor, group: _PaddedGroup) -> torch.Tensor:
    """Read positions 0..max_seq_len-1 of every sequence of the group through its block table:
    [Bg, max_seq_len, H, D].

    Whole blocks are gathered (one contiguous copy each, much faster than per-position indexing); positions
    past a sequence's length read whatever block the padding points at, and the mask hides them.
    """
    num_heads, head_dim = cache.shape[2:]
    blocks = cache.index_select(0, group.key_blocks)  # [Bg * num_blocks, block_size, H, D]
    return blocks.view(group.num_seqs, -1, num_heads, head_dim)[:, : group.max_seq_len]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the new tokens ([T, Hq, D]) over their sequences' cached K/V; returns [T, Hq, D]."""
    out = torch.empty_like(query)
    for group in _groups(meta, k_cache.shape[1]):
        max_query_len = int(group.mask.shape[2])
        padded_query = query.new_zeros(group.num_seqs, max_query_len, *query.shape[1:])
        padded_query[group.seq_of_token, group.index_in_seq] = query[group.tokens]
        keys = gather_kv(k_cache, group)
        values = gather_kv(v_cache, group)
        attended = F.scaled_dot_product_attention(
            padded_query.transpose(1, 2),  # [Bg, Hq, Qg, D]
            keys.transpose(1, 2).to(query.dtype),  # [Bg, Hkv, Sg, D]
            values.transpose(1, 2).to(query.dtype),
            attn_mask=group.mask,
            scale=scale,
            enable_gqa=query.shape[1] != k_cache.shape[2],
        )
        out[group.tokens] = attended.transpose(1, 2)[group.seq_of_token, group.index_in_seq]
    return out
