"""The native CPU backend: paged attention through worker/native/paged_attention.cpp, which reads K/V
pages in place through the block tables instead of gathering every sequence's context each layer, and
the layers that come with it: fused element-wise layers (worker/layers/fused_cpu.py) and linear layers
over packed weights (worker/layers/linear_cpu.py).

The libraries are built at first use (worker/native/compiler.py) by `load()`, which raises if they
cannot be; backend.get_attention_ops then falls back to the torch path. Decode rows and prefill chunks,
GQA, any block size and float32/bfloat16/float16 are all served by the one attention kernel.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from paged.worker.attention import torch_ops
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.layers.fused_cpu import FusedOps
from paged.worker.layers.linear_cpu import NativeLinear
from paged.worker.native.compiler import load_library
from paged.worker.native.dtypes import dtype_code

SOURCE = Path(__file__).resolve().parent.parent / "native" / "paged_attention.cpp"

# The pages are written in place by index_copy_ on the cache's [slots, H, D] view: nothing to gain natively.
write_kv = torch_ops.write_kv


@functools.cache
def load() -> ctypes.CDLL:
    """The attention library, built on the first call with the fused and linear layers' (raises
    NativeBuildError if any cannot be built)."""
    fused_ops()
    native_linear()
    library = load_kernel(SOURCE)
    groups = library.paged_attention_shared_groups
    groups.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2
    groups.restype = ctypes.c_int
    return library


def load_kernel(source: Path) -> ctypes.CDLL:
    """A build of an attention kernel source with its entry point bound: this package's, or another
    version of it that a benchmark compares (the C ABI of `paged_attention` is the contract)."""
    library = load_library(source)
    function = library.paged_attention
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer] * 7 + [i64] * 10 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    function.restype = ctypes.c_int
    return library


@functools.cache
def fused_ops() -> FusedOps:
    """The fused element-wise layers the model loader gives a model running on this backend."""
    return FusedOps.build()


@functools.cache
def native_linear() -> NativeLinear:
    """The packed-weight linear layers the model loader gives a float32 model running on this backend."""
    return NativeLinear.build()


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    library: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens ([T, Hq, D]) over their sequences' cached K/V; returns [T, Hq, D].
    `library`: another build of the kernel (load_kernel) instead of this package's."""
    code = dtype_code("query and caches", query, k_cache, v_cache)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dim() == 4 and k_cache.shape == v_cache.shape):
        raise ValueError("the caches must be contiguous [num_blocks, block_size, num_kv_heads, head_dim] tensors of one shape")
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    if query.dim() != 3 or query.shape[2] != head_dim or query.stride(2) != 1:
        raise ValueError(f"the query must be [tokens, heads, {head_dim}] with dense head rows, got {list(query.shape)}")
    block_tables, query_start_loc, seq_lens = _checked_tables(meta, num_blocks, block_size, query.shape[0])
    out = torch.empty_like(query)
    status = (library or load()).paged_attention(
        query.data_ptr(),
        out.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        query_start_loc.data_ptr(),
        seq_lens.data_ptr(),
        seq_lens.shape[0],
        query.shape[1],
        num_kv_heads,
        head_dim,
        block_size,
        block_tables.stride(0),
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        scale,
        code,
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"unsupported attention shape: {query.shape[1]} query heads over {num_kv_heads} KV heads")
    return out


def shared_prefix_groups(meta: AttentionMetadata, num_q_heads: int, k_cache: torch.Tensor) -> tuple[list[int], list[int]]:
    """The groups the kernel's shared-prefix (cascade) pass forms for this batch: per sequence, the index
    of its group or -1, and the number of leading keys the group attends together (0 outside a group)."""
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    block_tables, query_start_loc, seq_lens = _checked_tables(meta, num_blocks, block_size, int(meta.query_start_loc[-1]))
    group_of = torch.empty(len(seq_lens), dtype=torch.int32)
    shared_keys = torch.empty(len(seq_lens), dtype=torch.int64)
    status = load().paged_attention_shared_groups(
        block_tables.data_ptr(), query_start_loc.data_ptr(), seq_lens.data_ptr(), len(seq_lens), num_q_heads,
        num_kv_heads, block_size, block_tables.stride(0), group_of.data_ptr(), shared_keys.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"unsupported attention shape: {num_q_heads} query heads over {num_kv_heads} KV heads")
    return group_of.tolist(), shared_keys.tolist()


def _checked_tables(meta: AttentionMetadata, num_blocks: int, block_size: int, num_tokens: int) -> tuple[torch.Tensor, ...]:
    """The int32 tables the kernel reads, checked once per forward pass (the first layer; again if a
    call brings another pool or query) so that bad metadata raises here instead of making native code
    read outside the pool."""
    checked_against = (num_blocks, block_size, num_tokens)
    checked = meta.derived.get("cpu")
    tables = checked[1] if checked is not None and checked[0] == checked_against else None
    if tables is None:
        block_tables, query_start_loc, seq_lens = (
            tensor.to(torch.int32).contiguous() for tensor in (meta.block_tables, meta.query_start_loc, meta.seq_lens)
        )
        query_lens = query_start_loc[1:] - query_start_loc[:-1]
        if len(query_start_loc) != len(seq_lens) + 1 or len(block_tables) != len(seq_lens):
            raise ValueError("block_tables, query_start_loc and seq_lens disagree on the number of sequences")
        if len(seq_lens) and (
            int(query_start_loc[0]) < 0
            or int(query_start_loc[-1]) > num_tokens
            or bool((query_lens < 0).any())
            or bool((seq_lens < query_lens).any())
            or int(seq_lens.max()) > block_tables.shape[1] * block_size
            or (block_tables.numel() and not 0 <= int(block_tables.min()) <= int(block_tables.max()) < num_blocks)
        ):
            raise ValueError("attention metadata points outside the block tables or the page pool")
        tables = (block_tables, query_start_loc, seq_lens)
        meta.derived["cpu"] = (checked_against, tables)
    return tables
