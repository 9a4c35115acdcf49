"""The native CPU paged-attention kernel (worker/native/paged_attention.cpp) against the torch path, the
reference it replaces, and against attention over the dense, never-paged K/V.

Every batch scatters its sequences over a shuffled pool of physical blocks. The kernel has two score
paths (dot products for decode tiles, a transposed key tile for prefill tiles), rows read in place or
copied and padded (head_dim not a multiple of 16, bf16/fp16), unrolled kernels up to head_dim 256 and
loops past it, 64-key tiles and 128-row query tiles: the cases below cross each of those boundaries.
Decode rows of sequences whose tables start with the same blocks first attend those together (the
cascade pass); the batches with `shares` exercise it, and its grouping is checked on its own.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paged.worker.attention import cpu_ops, torch_ops
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.native.compiler import NativeBuildError
from support.paged_batch import PagedBatch, assert_close_to_reference, chunk_of, dense_reference, make_batch
from support.torch_threads import with_threads

try:
    cpu_ops.load()
except NativeBuildError as exc:  # pragma: no cover - machines with a compiler run these tests
    pytest.skip(f"the native kernel cannot be built here: {exc}", allow_module_level=True)


def run_native(batch: PagedBatch) -> torch.Tensor:
    return cpu_ops.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale)


def run_torch(batch: PagedBatch) -> torch.Tensor:
    return torch_ops.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale)


def assert_matches_torch_path(batch: PagedBatch) -> None:
    torch.testing.assert_close(run_native(batch), run_torch(batch), atol=2e-5, rtol=2e-5)


# Ragged decode rows: a first token, one ending on a block boundary, several spanning 64-key tiles.
DECODE_CONTEXTS = [0, 15, 31, 63, 64, 100, 300]
# Mixed batches: fresh prompts, chunks continuing a cached prefix (chunked prefill), decode rows, and a
# chunk longer than one query tile so the causal diagonal falls inside and across tiles.
MIXED = ([0, 21, 40, 0, 9, 130, 5], [13, 30, 1, 1, 70, 45, 1])


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 4), (8, 1), (8, 8)])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_decode_matches_torch_path(block_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    batch = make_batch(
        DECODE_CONTEXTS, [1] * len(DECODE_CONTEXTS),
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
    )
    assert_matches_torch_path(batch)
    assert_close_to_reference(batch, run_native(batch))


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 4), (8, 1)])
@pytest.mark.parametrize("head_dim", [8, 32, 80])
def test_mixed_prefill_and_decode_match_torch_path(block_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    batch = make_batch(
        *MIXED, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, seed=block_size,
    )
    assert_matches_torch_path(batch)
    assert_close_to_reference(batch, run_native(batch))


def test_chunked_prefill_equals_whole_prefill() -> None:
    """The same prompt attended in chunks of 37 (each over the cached chunks before it) gives the
    outputs of one whole-prompt pass."""
    whole = make_batch([0], [150], num_q_heads=8, num_kv_heads=4, head_dim=64, block_size=16, seed=8)
    whole_out = run_native(whole)
    for start in range(0, 150, 37):
        end = min(start + 37, 150)
        query, chunk_meta = chunk_of(whole, start, end)
        out = cpu_ops.paged_attention(query, whole.k_cache, whole.v_cache, chunk_meta, whole.scale)
        torch.testing.assert_close(out, whole_out[start:end], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_reference(dtype: torch.dtype) -> None:
    for head_dim in (8, 64):
        batch = make_batch(*MIXED, head_dim=head_dim, dtype=dtype, seed=9)
        out = run_native(batch)
        assert out.dtype == dtype
        assert_close_to_reference(batch, out)
        # Scores, softmax and sums in float32, one rounding at the end: the float64 result rounded to
        # the dtype, but for the few that lie within float32's error of a rounding boundary.
        assert (out != dense_reference(batch).to(dtype)).double().mean().item() < 0.01


def test_head_dim_beyond_the_unrolled_kernels() -> None:
    """head_dim 272 pads to 17 vectors, past the unrolled kernels (16): the run-time loop versions."""
    batch = make_batch(*MIXED, num_q_heads=2, num_kv_heads=1, head_dim=272, seed=3)
    assert_matches_torch_path(batch)


def test_sequence_with_no_new_tokens_is_left_alone() -> None:
    batch = make_batch([4, 6, 2], [3, 0, 2], seed=7)
    assert_close_to_reference(batch, run_native(batch))


def test_strided_query_rows() -> None:
    """Q as a slice of a fused QKV projection: rows are strided, head_dim is dense."""
    batch = make_batch(*MIXED, head_dim=32, seed=4)
    fused = torch.cat([batch.query, torch.zeros_like(batch.query)], dim=1)
    strided = fused[:, : batch.query.shape[1]]
    assert not strided.is_contiguous()
    out = cpu_ops.paged_attention(strided, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out, run_native(batch), atol=0, rtol=0)


def assert_threads_agree(batch: PagedBatch) -> None:
    """Work items split between threads (and their KV heads between items) give bit-identical results."""
    single = with_threads(1, lambda: run_native(batch))
    torch.testing.assert_close(with_threads(3, lambda: run_native(batch)), single, atol=0, rtol=0)


def test_threads_give_the_same_result() -> None:
    assert_threads_agree(make_batch(*MIXED, num_q_heads=8, num_kv_heads=2, head_dim=64, seed=5))


def test_rejects_bad_metadata_before_reading_pages() -> None:
    batch = make_batch([10, 3], [1, 1], block_size=16)
    meta = batch.meta
    outside_pool = meta.block_tables.clone()
    outside_pool[0, 0] = batch.k_cache.shape[0]
    too_long = meta.seq_lens.clone()
    too_long[1] = meta.block_tables.shape[1] * 16 + 1
    past_the_queries = meta.query_start_loc + 1  # rows 1..2 of a 2-row query
    for block_tables, seq_lens, query_start_loc in (
        (outside_pool, meta.seq_lens, meta.query_start_loc),
        (meta.block_tables, too_long, meta.query_start_loc),
        (meta.block_tables, meta.seq_lens, past_the_queries),
    ):
        bad = AttentionMetadata(meta.slot_mapping, query_start_loc, seq_lens, block_tables, 1, int(seq_lens.max()))
        with pytest.raises(ValueError, match="outside"):
            cpu_ops.paged_attention(batch.query, batch.k_cache, batch.v_cache, bad, batch.scale)
    # Checked once per forward pass, but against the pool it is read from: a smaller one is refused too.
    run_native(batch)
    smaller = int(meta.block_tables.max())
    with pytest.raises(ValueError, match="outside"):
        cpu_ops.paged_attention(batch.query, batch.k_cache[:smaller], batch.v_cache[:smaller], meta, batch.scale)


def test_rejects_mismatched_heads() -> None:
    batch = make_batch([0], [2], num_q_heads=8, num_kv_heads=4)
    with pytest.raises(ValueError, match="query heads"):
        cpu_ops.paged_attention(batch.query[:, :6], batch.k_cache, batch.v_cache, batch.meta, batch.scale)


def test_rejects_tensors_the_kernel_would_misread() -> None:
    """Raw pointers go to native code: a query whose head_dim is not the cache's (reads and writes past
    its rows) or a value cache of another dtype or device (read as the key cache's dtype) is refused."""
    batch = make_batch([10, 30], [1, 3], head_dim=64)
    query, k_cache, v_cache = batch.query, batch.k_cache, batch.v_cache
    for bad_query, bad_v_cache in (
        (query[..., :32].contiguous(), v_cache),
        (query.reshape(len(query), -1), v_cache),
        (query, v_cache.half()),
        (query, v_cache.to("meta")),
    ):
        with pytest.raises((TypeError, ValueError)):
            cpu_ops.paged_attention(bad_query, k_cache, bad_v_cache, batch.meta, batch.scale)


@st.composite
def batch_layouts(draw: st.DrawFn) -> dict:
    """Any mix of sequences: cached prefixes of 0..150 tokens and 1..80 new tokens each (or all decode)."""
    num_seqs = draw(st.integers(1, 5))
    all_decode = draw(st.booleans())
    num_kv_heads = draw(st.sampled_from([1, 2, 4]))
    return dict(
        context_lens=[draw(st.integers(0, 150)) for _ in range(num_seqs)],
        query_lens=[1 if all_decode else draw(st.integers(1, 80)) for _ in range(num_seqs)],
        num_q_heads=num_kv_heads * draw(st.sampled_from([1, 2, 8])),
        num_kv_heads=num_kv_heads,
        head_dim=draw(st.sampled_from([8, 16, 24, 64])),
        block_size=draw(st.sampled_from([1, 8, 16, 32])),
        seed=draw(st.integers(0, 2**16)),
    )


# The shared-prefix (cascade) pass. A prefix of `n` blocks shared with sequence 0: sequence b's first n
# table entries are sequence 0's, as the gateway's prefix cache gives them.
def shared_with_first(shared_blocks: list[int]) -> dict[int, tuple[int, int]]:
    return {b: (0, n) for b, n in enumerate(shared_blocks) if b and n}


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 4), (8, 1)])
@pytest.mark.parametrize("head_dim", [8, 64])
def test_shared_prefix_decode_matches_torch_path(block_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Ten decode rows over a 96-token prefix of sequence 0, ragged own parts after it (none, inside the
    block that ends the prefix's run, across key tiles); one sharing only the first block, one nothing."""
    prefix_blocks = 96 // block_size
    contexts = [100, 96, 97, 111, 150, 200, 96, 130, 96, 300, 140, 90]
    shared = [0] + [prefix_blocks] * 9 + [1, 0]
    batch = make_batch(
        contexts, [1] * len(contexts), num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, seed=block_size, shares=shared_with_first(shared),
    )
    group_of, shared_keys = cpu_ops.shared_prefix_groups(batch.meta, num_q_heads, batch.k_cache)
    assert group_of[:10] == [0] * 10 and shared_keys[:10] == [96] * 10
    assert_matches_torch_path(batch)
    assert_close_to_reference(batch, run_native(batch))


def test_shared_prefix_groups() -> None:
    """Two prefixes shared by two sets of sequences (interleaved in the batch) make two groups; a chain
    that shares more with some members makes one group over what all of them share. A sequence sharing
    only the first block stays out (the others share more without it), and so do prefill chunks."""
    contexts = [64, 80, 64, 64, 96, 128, 70, 64, 64]
    query_lens = [1, 1, 1, 1, 1, 1, 1, 20, 1]
    shares = {2: (0, 4), 3: (1, 4), 4: (0, 4), 5: (4, 6), 6: (1, 4), 7: (0, 4), 8: (0, 1)}
    batch = make_batch(contexts, query_lens, block_size=16, shares=shares)
    group_of, shared_keys = cpu_ops.shared_prefix_groups(batch.meta, 8, batch.k_cache)
    first, second = group_of[0], group_of[1]
    assert first != second and -1 not in (first, second)
    assert [g for g in group_of if g == first] == [first] * 4 and group_of[2] == group_of[4] == group_of[5] == first
    assert group_of[3] == group_of[6] == second
    assert group_of[7] == group_of[8] == -1
    assert shared_keys == [64, 64, 64, 64, 64, 64, 64, 0, 0]
    assert_matches_torch_path(batch)


def test_longest_common_run_wins() -> None:
    """Eight sequences share 2 blocks; four of them share 8. Reading 8 blocks once for four rows saves more
    than 2 blocks for eight (4 x 3 x 8 > 2 x 7 x 2), so the four form the group; the rest, sharing only 2
    blocks among themselves, form another."""
    contexts = [128] * 8
    shares = {b: (0, 8 if b < 4 else 2) for b in range(1, 8)}
    batch = make_batch(contexts, [1] * 8, block_size=16, shares=shares)
    group_of, shared_keys = cpu_ops.shared_prefix_groups(batch.meta, 8, batch.k_cache)
    assert len(set(group_of[:4])) == 1 and len(set(group_of[4:])) == 1 and group_of[0] != group_of[4]
    assert shared_keys == [128] * 4 + [32] * 4
    assert_matches_torch_path(batch)


@pytest.mark.parametrize("block_size", [1, 16])
def test_shared_prefix_with_prefill_chunks_and_fresh_prompts(block_size: int) -> None:
    """A step mixing decode rows that share a prefix, a prefill chunk continuing the same prefix (its rows
    take the transposed path, outside the group), a fresh prompt and unshared decode rows."""
    prefix_blocks = 64 // block_size
    contexts = [70, 64, 80, 64, 0, 33, 100]
    query_lens = [1, 1, 1, 50, 17, 1, 1]
    shares = {1: (0, prefix_blocks), 2: (0, prefix_blocks), 3: (0, prefix_blocks), 6: (0, prefix_blocks)}
    batch = make_batch(contexts, query_lens, block_size=block_size, head_dim=64, seed=11, shares=shares)
    group_of, _ = cpu_ops.shared_prefix_groups(batch.meta, 8, batch.k_cache)
    assert group_of[0] != -1 and group_of == [group_of[0]] * 3 + [-1] * 3 + [group_of[0]]
    assert_matches_torch_path(batch)
    assert_close_to_reference(batch, run_native(batch))


def test_many_members_fill_several_items() -> None:
    """80 decode rows of GQA 8/1 (8 rows each per KV head) over one prefix: 16 members per item of 128 rows."""
    contexts = [48 + b % 7 for b in range(80)]
    batch = make_batch(contexts, [1] * 80, num_q_heads=8, num_kv_heads=1, head_dim=32, shares={b: (0, 3) for b in range(1, 80)})
    assert set(cpu_ops.shared_prefix_groups(batch.meta, 8, batch.k_cache)[1]) == {48}
    assert_matches_torch_path(batch)


def test_shared_prefix_threads_give_the_same_result() -> None:
    contexts = [90, 96, 120, 200, 96, 50]
    assert_threads_agree(make_batch(contexts, [1] * 6, num_kv_heads=2, head_dim=64, seed=5, shares={b: (0, 5) for b in range(1, 5)}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_prefix_low_precision(dtype: torch.dtype) -> None:
    batch = make_batch([64, 64, 80, 100], [1] * 4, head_dim=64, dtype=dtype, shares={b: (0, 4) for b in (1, 2, 3)})
    assert_close_to_reference(batch, run_native(batch))


@st.composite
def shared_layouts(draw: st.DrawFn) -> dict:
    """Decode-heavy batches where each sequence may share any number of whole blocks of an earlier one."""
    block_size = draw(st.sampled_from([1, 4, 16]))
    num_seqs = draw(st.integers(2, 9))
    contexts, query_lens, shares = [], [], {}
    for b in range(num_seqs):
        query_len = draw(st.sampled_from([1, 1, 1, 2, 9]))
        context = draw(st.integers(0, 120))
        if b and draw(st.booleans()):
            owner = draw(st.integers(0, b - 1))
            most = min(context, contexts[owner] + query_lens[owner]) // block_size
            if most:
                shares[b] = (owner, draw(st.integers(1, most)))
        contexts.append(context)
        query_lens.append(query_len)
    num_kv_heads = draw(st.sampled_from([1, 2, 4]))
    return dict(
        context_lens=contexts, query_lens=query_lens, shares=shares, block_size=block_size, num_kv_heads=num_kv_heads,
        num_q_heads=num_kv_heads * draw(st.sampled_from([1, 2, 8])), head_dim=draw(st.sampled_from([8, 24, 64])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=80, deadline=None)
@given(st.one_of(batch_layouts(), shared_layouts()))
def test_random_layouts_match_torch_path(layout: dict) -> None:
    batch = make_batch(layout.pop("context_lens"), layout.pop("query_lens"), **layout)
    assert_matches_torch_path(batch)
