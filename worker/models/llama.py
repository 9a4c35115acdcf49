"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Parameter names match Hugging Face checkpoints, so a checkpoint's tensors load by name without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paged.worker.attention.backend import AttentionOps
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.layers.attention import PagedSelfAttention
from paged.worker.layers.fused_cpu import FusedOps
from paged.worker.layers.linear_cpu import NativeLinear, pack_linear_layers
from paged.worker.layers.mlp import GatedMLP
from paged.worker.layers.rms_norm import RMSNorm
from paged.worker.layers.rotary import RotaryEmbedding
from paged.worker.model_config import ModelArch

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rotary: RotaryEmbedding, attention_ops: AttentionOps) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = PagedSelfAttention(arch, rotary, attention_ops)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, arch.mlp_bias)

    def forward(
        self,
        positions: torch.Tensor,
        residual: torch.Tensor,
        delta: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is `residual + delta` (delta None for the first layer); returns this layer's
        (delta, residual) in the same form, so that each residual add happens inside the next norm."""
        if delta is None:
            normed = self.input_layernorm(residual)
        else:
            normed, residual = self.input_layernorm.add_and_norm(residual, delta)
        attended = self.self_attn(positions, normed, kv_cache, meta)
        normed, residual = self.post_attention_layernorm.add_and_norm(residual, attended)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, attention_ops: AttentionOps) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(arch, self.rotary_emb, attention_ops) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        residual, delta = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            delta, residual = layer(positions, residual, delta, kv_cache, meta)
        return self.norm(residual) if delta is None else self.norm.add_and_norm(residual, delta)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, attention_ops: AttentionOps) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, attention_ops)
        # Tied checkpoints reuse the embedding matrix; no separate lm_head parameter exists to load.
        self.lm_head = None if arch.tie_word_embeddings else nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, hidden_size] of a flattened batch; writes its K/V into `kv_caches` on the way."""
        return self.model(input_ids, positions, kv_caches, meta)

    def use_fused_ops(self, fused: FusedOps) -> None:
        """Run the norms, rotary embedding and SiLU-mul through one native pass each (CPU)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, RotaryEmbedding, GatedMLP)):
                module.fused = fused

    def use_native_linear(self, native: NativeLinear) -> None:
        """Run the decoder layers' projections over packed weights (CPU, float32); the LM head stays on torch."""
        pack_linear_layers(self.model.layers, native)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] for the rows the caller samples from."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
