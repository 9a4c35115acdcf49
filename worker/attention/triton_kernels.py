"""The Triton kernels behind worker.attention.triton_ops (which launches them and documents the layout).

KV cache: [num_blocks, block_size, num_kv_heads, head_dim] for K and V alike, head_dim contiguous.
Both attention kernels gather a tile of key positions through the block table position by position, so
the key tile size is independent of the page size (block_size 1 works with full-size tiles) and a
shuffled block table costs nothing extra. Softmax is online in fp32 with exp2 (scale folded with log2 e).
"""

import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    num_kv_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    # Skipping slot -1 by bounding the head range (and-ing a scalar into a block mask trips the interpreter).
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (heads[:, None] < heads_to_write) & (dims[None, :] < head_dim)

    cache_offsets = (
        (slot // BLOCK_SIZE) * stride_cache_block
        + (slot % BLOCK_SIZE) * stride_cache_slot
        + heads[:, None] * stride_cache_head
        + dims[None, :]
    )
    key = tl.load(key_ptr + token * stride_key_t + heads[:, None] * stride_key_h + dims[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_value_t + heads[:, None] * stride_value_h + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + cache_offsets, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cache_row_offsets(
    block_table_ptr,
    positions,
    valid,
    kv_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    BLOCK_SIZE: tl.constexpr,
):
    """Element offsets of the cache rows holding `positions` of one sequence for one KV head."""
    block_ids = tl.load(block_table_ptr + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    # int64 before multiplying: a large pool's element offsets overflow int32.
    return block_ids * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_slot + kv_head * stride_cache_head


@triton.jit
def store_decode_output(out_ptr, acc, total, has_query, token, head, dims, stride_out_t, stride_out_h, head_dim):
    """One query head's decode output, acc / total, stored only if the sequence has a query this step.
    A sequence without one attended to nothing (total 0): the stand-in divisor keeps its unstored row finite."""
    out = acc / tl.where(total > 0, total, 1.0)
    dims_to_store = tl.where(has_query, head_dim, 0)
    tl.store(
        out_ptr + token * stride_out_t + head * stride_out_h + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < dims_to_store,
    )


@triton.jit
def paged_decode_kernel(
    out_ptr,
    query_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    stride_query_t,
    stride_query_h,
    stride_out_t,
    stride_out_h,
    stride_block_table,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    head_dim,
    partial_max_ptr,
    partial_sum_ptr,
    partial_acc_ptr,
    num_q_heads,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = head // QUERIES_PER_KV
    token = tl.load(query_start_loc_ptr + seq)
    has_query = tl.load(query_start_loc_ptr + seq + 1) > token
    # A sequence with no new token this step reads nothing and writes nothing.
    seq_len = tl.where(has_query, tl.load(seq_lens_ptr + seq), 0)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_block_table

    # Split-K: each of NUM_SPLITS programs takes a BLOCK_N-aligned share of the keys (some may get none).
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    split_start = split * split_len
    split_end = tl.minimum(split_start + split_len, seq_len)

    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    query = tl.load(query_ptr + token * stride_query_t + head * stride_query_h + dims, mask=dim_mask, other=0.0)
    query = query.to(tl.float32)

    # Key tiles are never fully masked (they start below split_end), so -inf is a safe initial maximum.
    running_max = float("-inf")
    running_sum = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(split_start, split_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < split_end
        rows = cache_row_offsets(
            block_table_ptr, positions, valid, kv_head,
            stride_cache_block, stride_cache_slot, stride_cache_head, BLOCK_SIZE,
        )
        tile_mask = valid[:, None] & dim_mask[None, :]
        key = tl.load(k_cache_ptr + rows[:, None] + dims[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        # One query row: a broadcast multiply-reduce beats padding tl.dot up to 16 rows.
        scores = tl.sum(key * query[None, :], axis=1) * scale_log2
        scores = tl.where(valid, scores, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        probs = tl.exp2(scores - new_max)
        rescale = tl.exp2(running_max - new_max)
        value = tl.load(v_cache_ptr + rows[:, None] + dims[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        acc = acc * rescale + tl.sum(probs[:, None] * value, axis=0)
        running_sum = running_sum * rescale + tl.sum(probs, axis=0)
        running_max = new_max

    if NUM_SPLITS == 1:
        store_decode_output(out_ptr, acc, running_sum, has_query, token, head, dims, stride_out_t, stride_out_h, head_dim)
    else:
        # Unnormalized partial state; combine_splits_kernel merges the splits. Empty splits store -inf / 0.
        partial = (seq * num_q_heads + head) * NUM_SPLITS + split
        tl.store(partial_max_ptr + partial, running_max)
        tl.store(partial_sum_ptr + partial, running_sum)
        tl.store(partial_acc_ptr + partial * BLOCK_D + dims, acc)


@triton.jit
def combine_splits_kernel(
    out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    partial_acc_ptr,
    query_start_loc_ptr,
    stride_out_t,
    stride_out_h,
    num_q_heads,
    head_dim,
    NUM_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq)
    has_query = tl.load(query_start_loc_ptr + seq + 1) > token

    partials = (seq * num_q_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    maxes = tl.load(partial_max_ptr + partials)
    sums = tl.load(partial_sum_ptr + partials)
    accs = tl.load(partial_acc_ptr + partials[:, None] * BLOCK_D + dims[None, :])

    # Rescale every split to the common maximum; empty splits (max -inf) weigh exp2(-inf) = 0. A sequence
    # without a query has only empty splits: a finite stand-in maximum keeps -inf - -inf (NaN) out.
    global_max = tl.max(maxes, axis=0)
    global_max = tl.where(global_max > float("-inf"), global_max, 0.0)
    weights = tl.exp2(maxes - global_max)
    store_decode_output(
        out_ptr, tl.sum(weights[:, None] * accs, axis=0), tl.sum(weights * sums, axis=0), has_query,
        token, head, dims, stride_out_t, stride_out_h, head_dim,
    )


@triton.jit
def paged_prefill_kernel(
    out_ptr,
    query_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    stride_query_t,
    stride_query_h,
    stride_out_t,
    stride_out_h,
    stride_block_table,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    head_dim,
    QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    query_tile = tl.program_id(2)
    kv_head = head // QUERIES_PER_KV
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_block_table

    rows = query_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # index among this sequence's new tokens
    row_valid = rows < query_len
    query_positions = context_len + rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    query_offsets = (query_start + rows)[:, None].to(tl.int64) * stride_query_t + head * stride_query_h + dims[None, :]
    query = tl.load(query_ptr + query_offsets, mask=row_valid[:, None] & dim_mask[None, :], other=0.0)
    if DOT_IN_FP32:
        query = query.to(tl.float32)

    # The tile's last query sees keys up to its own position; tiles past the sequence's queries skip the loop.
    tile_first_row = query_tile * BLOCK_M
    kv_end = tl.minimum(context_len + tile_first_row + BLOCK_M, seq_len)
    kv_end = tl.where(tile_first_row < query_len, kv_end, 0)

    # Every row (padding rows included) sees key 0 in the first tile, so -inf is a safe initial maximum.
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, kv_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < kv_end
        cache_rows = cache_row_offsets(
            block_table_ptr, positions, valid, kv_head,
            stride_cache_block, stride_cache_slot, stride_cache_head, BLOCK_SIZE,
        )
        tile_mask = valid[:, None] & dim_mask[None, :]
        key = tl.load(k_cache_ptr + cache_rows[:, None] + dims[None, :], mask=tile_mask, other=0.0)
        # "ieee" keeps fp32 caches exact (no TF32); it is ignored for fp16/bf16 inputs.
        scores = tl.dot(query, tl.trans(key.to(query.dtype)), input_precision="ieee") * scale_log2
        visible = (positions[None, :] <= query_positions[:, None]) & valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        probs = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(running_max - new_max)
        value = tl.load(v_cache_ptr + cache_rows[:, None] + dims[None, :], mask=tile_mask, other=0.0)
        value = value.to(query.dtype)
        acc = acc * rescale[:, None] + tl.dot(probs.to(value.dtype), value, input_precision="ieee")
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        running_max = new_max

    # Padding rows of an empty tile never ran the loop; keep their (unstored) division finite.
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    out_offsets = (query_start + rows)[:, None].to(tl.int64) * stride_out_t + head * stride_out_h + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_mask[None, :])
