"""Paged attention in Triton: the CUDA path, with the signatures of worker.attention.torch_ops.

Cache layout: [num_blocks, block_size, num_kv_heads, head_dim] for both K and V (same strides), the last
dimension contiguous. The kernels (worker.attention.triton_kernels):

- `write_kv_kernel`: one program per new token stores its K/V rows at its slot (slot -1 is skipped, so
  padded or already-cached tokens can be left out without compacting the batch).
- `paged_decode_kernel`: one program per (sequence, query head, key split) for batches where every
  sequence brings exactly one new token; it walks its share of the keys tile by tile through the block
  table. With more than one split (small batch, long context on a large GPU) each program leaves a
  partial softmax state and `combine_splits_kernel` merges them (flash-decoding).
- `paged_prefill_kernel`: one program per (sequence, query head, tile of new tokens), FlashAttention
  style, with the causal mask shifted by the sequence's cached context; decode rows in a mixed batch are
  just tiles with a single valid query.
"""

from __future__ import annotations

import functools

import torch
import triton

from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.attention.triton_kernels import (
    combine_splits_kernel,
    paged_decode_kernel,
    paged_prefill_kernel,
    write_kv_kernel,
)

_LOG2_E = 1.4426950408889634

# Tile sizes. tl.dot needs every dimension >= 16 on GPU, hence the floors in _head_dim_tile and here.
_DECODE_BLOCK_N = 64
_PREFILL_BLOCK_N = 64
_PREFILL_BLOCK_M_SMALL = 16  # when every sequence brings few new tokens (decode-heavy mixed batches)
_PREFILL_BLOCK_M_LARGE = 64
_DECODE_MIN_KEYS_PER_SPLIT = 256
_DECODE_MAX_SPLITS = 16


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether the prefill kernel must upcast its tl.dot operands to fp32.

    Only under the Triton interpreter with bf16: it stores bf16 as raw uint16 bits and its tl.dot
    multiplies those bits as integers. On GPU bf16 stays bf16 so tl.dot uses tensor cores.
    """
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode_splits(num_seqs: int, num_q_heads: int, max_seq_len: int, device: torch.device) -> int:
    """How many programs share one (sequence, head)'s keys in the decode kernel: a power of two.

    One program per (sequence, head) leaves most SMs idle at small batch and long context; splitting the
    keys (flash-decoding) fills about two waves, as long as each split still gets a few tiles to amortize
    the extra combine pass. Off CUDA (the interpreter) there is nothing to fill: one split.
    """
    if device.type != "cuda":
        return 1
    programs = num_seqs * num_q_heads
    wanted = min(
        triton.cdiv(2 * _multiprocessor_count(_cuda_index(device)), programs),
        max_seq_len // _DECODE_MIN_KEYS_PER_SPLIT,
        _DECODE_MAX_SPLITS,
    )
    return 1 << (wanted.bit_length() - 1) if wanted > 1 else 1


def _head_dim_tile(head_dim: int) -> int:
    """Padded head_dim tile: a power of two (masked past head_dim) and at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim] with equal strides, "
            f"got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}"
        )
    if k_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dimension (head_dim, block-table entries, 1-D metadata) with stride 1."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the new tokens' K/V ([T, Hkv, D]) at their slots (block_id * block_size + offset), in place.

    Slot -1 leaves that token unwritten. key/value may be strided views (e.g. slices of a fused QKV output).
    """
    _check_cache(k_cache, v_cache)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    key = _last_dim_contiguous(key)
    value = _last_dim_contiguous(value)
    write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        _last_dim_contiguous(slot_mapping),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_kv_heads,
        head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the new tokens ([T, Hq, D]) over their sequences' cached K/V; returns [T, Hq, D].

    Must run after write_kv: the new tokens' own keys are read back from the cache. Pure-decode batches
    (max_query_len == 1) take the decode kernel; anything else takes the prefill kernel.
    """
    _check_cache(k_cache, v_cache)
    num_tokens, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} does not match the cache's {cache_head_dim}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    query = _last_dim_contiguous(query)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out

    block_tables = _last_dim_contiguous(meta.block_tables)
    query_start_loc = _last_dim_contiguous(meta.query_start_loc)
    common_args = (
        out,
        query,
        k_cache,
        v_cache,
        block_tables,
        _last_dim_contiguous(meta.seq_lens),
        query_start_loc,
        scale * _LOG2_E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        head_dim,
    )
    queries_per_kv = num_q_heads // num_kv_heads
    block_d = _head_dim_tile(head_dim)
    if meta.max_query_len == 1:
        num_splits = _decode_splits(meta.num_seqs, num_q_heads, meta.max_seq_len, query.device)
        # With one split the kernel writes `out` itself; the partial buffers are never touched.
        partial_max = partial_sum = partial_acc = out
        if num_splits > 1:
            num_partials = meta.num_seqs * num_q_heads * num_splits
            partial_max = torch.empty(num_partials, dtype=torch.float32, device=query.device)
            partial_sum = torch.empty_like(partial_max)
            partial_acc = torch.empty(num_partials, block_d, dtype=torch.float32, device=query.device)
        paged_decode_kernel[(meta.num_seqs, num_q_heads, num_splits)](
            *common_args,
            partial_max,
            partial_sum,
            partial_acc,
            num_q_heads,
            QUERIES_PER_KV=queries_per_kv,
            BLOCK_SIZE=block_size,
            BLOCK_N=_DECODE_BLOCK_N,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
        )
        if num_splits > 1:
            combine_splits_kernel[(meta.num_seqs, num_q_heads)](
                out,
                partial_max,
                partial_sum,
                partial_acc,
                query_start_loc,
                out.stride(0),
                out.stride(1),
                num_q_heads,
                head_dim,
                NUM_SPLITS=num_splits,
                BLOCK_D=block_d,
            )
    else:
        block_m = _PREFILL_BLOCK_M_SMALL if meta.max_query_len <= _PREFILL_BLOCK_M_SMALL else _PREFILL_BLOCK_M_LARGE
        grid = (meta.num_seqs, num_q_heads, triton.cdiv(meta.max_query_len, block_m))
        paged_prefill_kernel[grid](
            *common_args,
            QUERIES_PER_KV=queries_per_kv,
            BLOCK_SIZE=block_size,
            BLOCK_M=block_m,
            BLOCK_N=_PREFILL_BLOCK_N,
            BLOCK_D=block_d,
            DOT_IN_FP32=_dot_in_fp32(query.dtype),
        )
    return out
