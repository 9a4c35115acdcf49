"""The Triton paged-attention kernels against a naive dense reference and the torch path.

Runs on CPU through the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported), so
shapes stay small. Each case builds sequences with a cached prefix and some new tokens, scatters them
over a shuffled pool of physical blocks, writes the new tokens with the Triton cache-write kernel and
compares attention outputs with attention computed over the dense, never-paged K/V.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed; the Triton attention path cannot be tested")

from support import paged_batch  # noqa: E402
from support.paged_batch import PagedBatch, assert_close_to_reference, chunk_of  # noqa: E402
from paged.worker.attention import torch_ops, triton_ops  # noqa: E402

# The new tokens' K/V go in through the Triton cache-write kernel, so every case tests it too.
make_batch = functools.partial(paged_batch.make_batch, write_kv=triton_ops.write_kv)


def run_triton(batch: PagedBatch) -> torch.Tensor:
    return triton_ops.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale)


# --- write_kv ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_matches_index_assignment(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 8, 2, 24  # non-power-of-two head_dim is masked
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    # K and V as strided slices of one fused projection, as a model's QKV split hands them over.
    fused = torch.randn(7, 2 * num_kv_heads + 1, head_dim, generator=generator).to(dtype)
    key, value = fused[:, :num_kv_heads], fused[:, num_kv_heads : 2 * num_kv_heads]
    slot_mapping = torch.tensor([17, 3, -1, 40, 47, -1, 0], dtype=torch.int64)

    triton_ops.write_kv(key, value, k_cache, v_cache, slot_mapping)

    written = slot_mapping >= 0
    expected_k.view(-1, num_kv_heads, head_dim)[slot_mapping[written]] = key[written]
    expected_v.view(-1, num_kv_heads, head_dim)[slot_mapping[written]] = value[written]
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_write_kv_casts_to_cache_dtype() -> None:
    k_cache = torch.zeros(2, 4, 1, 8, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(3, 1, 8)
    triton_ops.write_kv(key, -key, k_cache, v_cache, torch.tensor([5, 0, 7]))
    # Within one bf16 ulp: the interpreter truncates fp32 -> bf16 where CUDA rounds to nearest.
    bf16_ulp = dict(atol=0.0, rtol=2**-7)
    torch.testing.assert_close(k_cache.view(-1, 1, 8)[[5, 0, 7]].float(), key, **bf16_ulp)
    torch.testing.assert_close(v_cache.view(-1, 1, 8)[[5, 0, 7]].float(), -key, **bf16_ulp)


# --- decode kernel (every sequence brings one token) -----------------------------------------------


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 4), (8, 1)])
def test_decode_matches_reference(block_size: int, num_q_heads: int, num_kv_heads: int) -> None:
    # Ragged lengths: a first token, one ending exactly on a block boundary, several spanning key tiles.
    context_lens = [0, block_size - 1, 37, 70]
    batch = make_batch(
        context_lens, [1] * len(context_lens),
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, block_size=block_size,
    )
    assert_close_to_reference(batch, run_triton(batch))


@pytest.mark.parametrize("num_splits", [2, 8])
def test_split_k_decode_matches_reference(num_splits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Splitting only happens on CUDA; force it. Short sequences leave some splits empty, and the
    # sequence without a query leaves all of its splits empty.
    monkeypatch.setattr(triton_ops, "_decode_splits", lambda *_: num_splits)
    batch = make_batch([0, 3, 100, 150, 9], [1, 1, 1, 1, 0], num_q_heads=4, num_kv_heads=2, block_size=8, seed=13)
    assert_close_to_reference(batch, run_triton(batch))


@pytest.mark.parametrize("block_size", [1, 16])
def test_decode_head_dim_64_and_block_size_1(block_size: int) -> None:
    batch = make_batch([5, 66], [1, 1], head_dim=64, block_size=block_size, seed=3)
    assert_close_to_reference(batch, run_triton(batch))


# --- prefill kernel (prompts, chunks, mixed batches) -----------------------------------------------


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(8, 4), (8, 1)])
def test_prefill_mixed_batch_matches_reference(block_size: int, num_q_heads: int, num_kv_heads: int) -> None:
    # A fresh prompt, a chunk continuing a cached prefix, two decode rows and a chunk longer than one
    # query tile (BLOCK_M 64) so several query tiles and the causal diagonal inside a tile are exercised.
    context_lens = [0, 21, 40, 0, 9]
    query_lens = [13, 30, 1, 1, 70]
    batch = make_batch(
        context_lens, query_lens,
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, block_size=block_size, seed=block_size,
    )
    assert_close_to_reference(batch, run_triton(batch))


def test_prefill_block_size_1_and_head_dim_64() -> None:
    batch = make_batch([0, 17, 3], [9, 6, 1], head_dim=64, block_size=1, seed=5)
    assert_close_to_reference(batch, run_triton(batch))


def test_prefill_non_power_of_two_head_dim() -> None:
    batch = make_batch([4, 0], [5, 3], num_q_heads=4, num_kv_heads=2, head_dim=24, block_size=8, seed=6)
    assert_close_to_reference(batch, run_triton(batch))


def test_sequence_with_no_new_tokens_is_left_alone() -> None:
    # query_len 0 in the middle of a batch: neighbours' outputs must not be overwritten by it.
    for query_lens in ([3, 0, 2], [1, 0, 1]):
        batch = make_batch([4, 6, 2], query_lens, seed=7)
        assert_close_to_reference(batch, run_triton(batch))


def test_chunked_prefill_equals_whole_prefill() -> None:
    """The same prompt attended in chunks of 7 gives the outputs of one whole-prompt pass."""
    whole = make_batch([0], [20], block_size=8, seed=8)
    whole_out = run_triton(whole)
    for start in range(0, 20, 7):
        end = min(start + 7, 20)
        query, chunk_meta = chunk_of(whole, start, end)
        out = triton_ops.paged_attention(query, whole.k_cache, whole.v_cache, chunk_meta, whole.scale)
        torch.testing.assert_close(out, whole_out[start:end], atol=1e-5, rtol=1e-5)


@st.composite
def batch_layouts(draw: st.DrawFn) -> dict:
    """Any mix of sequences: cached prefixes of 0..40 tokens and 1..20 new tokens each (or all decode)."""
    num_seqs = draw(st.integers(1, 4))
    all_decode = draw(st.booleans())
    query_lens = [1 if all_decode else draw(st.integers(1, 20)) for _ in range(num_seqs)]
    num_kv_heads = draw(st.sampled_from([1, 2, 4]))
    return dict(
        context_lens=[draw(st.integers(0, 40)) for _ in range(num_seqs)],
        query_lens=query_lens,
        num_q_heads=num_kv_heads * draw(st.sampled_from([1, 2])),
        num_kv_heads=num_kv_heads,
        block_size=draw(st.sampled_from([1, 8, 16, 32])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=12, deadline=None)
@given(batch_layouts())
def test_random_layouts_match_reference(layout: dict) -> None:
    batch = make_batch(layout.pop("context_lens"), layout.pop("query_lens"), **layout)
    assert_close_to_reference(batch, run_triton(batch))


# --- low precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_decode_and_prefill(dtype: torch.dtype) -> None:
    decode = make_batch([3, 40], [1, 1], dtype=dtype, seed=9)
    assert_close_to_reference(decode, run_triton(decode))
    prefill = make_batch([0, 12], [11, 1], dtype=dtype, seed=10)
    assert_close_to_reference(prefill, run_triton(prefill))


# --- agreement with the torch path -----------------------------------------------------------------


@pytest.mark.parametrize("max_query_len", [1, 12])
def test_matches_torch_path(max_query_len: int) -> None:
    query_lens = [1, 1, 1] if max_query_len == 1 else [12, 1, 5]
    batch = make_batch([30, 0, 17], query_lens, block_size=16, seed=11)
    expected = torch_ops.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(run_triton(batch), expected, atol=1e-5, rtol=1e-5)


def test_write_kv_matches_torch_path() -> None:
    generator = torch.Generator().manual_seed(12)
    key, value = torch.randn(2, 5, 4, 8, generator=generator)
    slot_mapping = torch.tensor([9, 2, 31, 16, 0])
    triton_k, triton_v = torch.zeros(4, 8, 4, 8), torch.zeros(4, 8, 4, 8)
    torch_k, torch_v = torch.zeros(4, 8, 4, 8), torch.zeros(4, 8, 4, 8)
    triton_ops.write_kv(key, value, triton_k, triton_v, slot_mapping)
    torch_ops.write_kv(key, value, torch_k, torch_v, slot_mapping)
    assert torch.equal(triton_k, torch_k) and torch.equal(triton_v, torch_v)


def test_rejects_mismatched_heads() -> None:
    batch = make_batch([0], [2], num_q_heads=8, num_kv_heads=4)
    with pytest.raises(ValueError, match="multiple"):
        triton_ops.paged_attention(batch.query[:, :6], batch.k_cache, batch.v_cache, batch.meta, batch.scale)
