"""Paged decode attention (Triton) versus plain SDPA over a dense, contiguous KV cache. CUDA only.

For each context length, a batch of decode tokens attends over that many cached tokens: once through
the paged decode kernel reading shuffled pages, once through torch SDPA reading [B, Hkv, S, D] tensors
that need no block table. Prints milliseconds (median) and paged / dense; asserts nothing.

    python -m paged.ops.kernel_bench [--batch 8] [--contexts 512,2048] [--block-size 16] [--dtype float16]
"""

from __future__ import annotations

import click
import torch
import torch.nn.functional as F

from paged.worker.attention.metadata import AttentionMetadata

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _decode_case(
    batch: int,
    context: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, torch.Tensor]:
    """One decode step at `context` tokens per sequence: query, paged caches, metadata, and the same K/V dense."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    # Shuffled pages, as a long-running server's block pool hands them out.
    block_tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)

    positions = torch.arange(context, device=device)
    block_ids = block_tables[:, positions // block_size].long()  # [B, S]
    dense_k = k_cache[block_ids, positions % block_size].transpose(1, 2).contiguous()  # [B, Hkv, S, D]
    dense_v = v_cache[block_ids, positions % block_size].transpose(1, 2).contiguous()

    meta = AttentionMetadata(
        slot_mapping=(block_ids[:, -1] * block_size + (context - 1) % block_size),
        query_start_loc=torch.arange(batch + 1, device=device, dtype=torch.int32),
        seq_lens=torch.full((batch,), context, device=device, dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=1,
        max_seq_len=context,
    )
    query = torch.randn(batch, num_q_heads, head_dim, device=device, dtype=dtype)
    return query, k_cache, v_cache, meta, dense_k, dense_v


@click.command()
@click.option("--batch", default=8, show_default=True, help="decode tokens (sequences) per step")
@click.option("--contexts", default="512,2048", show_default=True, help="comma-separated context lengths")
@click.option("--num-q-heads", default=32, show_default=True)
@click.option("--num-kv-heads", default=8, show_default=True)
@click.option("--head-dim", default=128, show_default=True)
@click.option("--block-size", default=16, show_default=True)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float16", show_default=True)
def main(
    batch: int, contexts: str, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: str
) -> None:
    if not torch.cuda.is_available():
        click.echo("kernel_bench: CUDA is required (the Triton kernels run on GPU); nothing to measure here.")
        return
    # Imported only on CUDA machines: triton is not needed to print the message above.
    import triton.testing

    from paged.worker.attention import triton_ops

    torch.manual_seed(0)
    scale = head_dim**-0.5
    click.echo(
        f"device={torch.cuda.get_device_name()} batch={batch} heads={num_q_heads}/{num_kv_heads} "
        f"head_dim={head_dim} block_size={block_size} dtype={dtype}"
    )
    click.echo(f"{'context':>8} {'paged ms':>10} {'dense ms':>10} {'paged/dense':>12} {'max |diff|':>11}")
    for context in (int(c) for c in contexts.split(",")):
        query, k_cache, v_cache, meta, dense_k, dense_v = _decode_case(
            batch, context, num_q_heads, num_kv_heads, head_dim, block_size, DTYPES[dtype], torch.device("cuda")
        )

        def paged() -> torch.Tensor:
            return triton_ops.paged_attention(query, k_cache, v_cache, meta, scale)

        def dense() -> torch.Tensor:
            # [B, Hq, 1, D] against [B, Hkv, S, D]: no mask needed, the one query sees every key.
            return F.scaled_dot_product_attention(
                query[:, :, None], dense_k, dense_v, scale=scale, enable_gqa=num_q_heads != num_kv_heads
            )

        paged_ms = triton.testing.do_bench(paged, return_mode="median")
        dense_ms = triton.testing.do_bench(dense, return_mode="median")
        max_diff = (paged().float() - dense()[:, :, 0].float()).abs().max().item()
        click.echo(f"{context:>8} {paged_ms:>10.4f} {dense_ms:>10.4f} {paged_ms / dense_ms:>12.2f} {max_diff:>11.2e}")


if __name__ == "__main__":
    main()
