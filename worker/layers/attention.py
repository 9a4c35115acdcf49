"""Self-attention of the Llama family over the paged KV cache: project, (Qwen3) norm q/k, rotate,
write the new K/V into the pages, attend, project back."""

from __future__ import annotations

import torch
from torch import nn

from paged.worker.attention.backend import AttentionOps
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.layers.rms_norm import RMSNorm
from paged.worker.layers.rotary import RotaryEmbedding
from paged.worker.model_config import ModelArch


class PagedSelfAttention(nn.Module):
    def __init__(self, arch: ModelArch, rotary: RotaryEmbedding, attention_ops: AttentionOps) -> None:
        super().__init__()
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.q_proj = nn.Linear(arch.hidden_size, arch.num_heads * arch.head_dim, bias=arch.qkv_bias)
        self.k_proj = nn.Linear(arch.hidden_size, arch.num_kv_heads * arch.head_dim, bias=arch.qkv_bias)
        self.v_proj = nn.Linear(arch.hidden_size, arch.num_kv_heads * arch.head_dim, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=arch.o_bias)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.qk_norm = arch.qk_norm
        # Shared by every layer; kept out of this module's children so it is neither saved nor loaded per layer.
        self._rotary = (rotary,)
        self.ops = attention_ops

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        key = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = self._rotary[0](positions, query, key)
        k_cache, v_cache = kv_cache
        self.ops.write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        out = self.ops.paged_attention(query, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))
