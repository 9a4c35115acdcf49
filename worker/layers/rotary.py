"""Rotary position embedding (rotate-half convention of Hugging Face Llama) from a precomputed cos/sin table."""

from __future__ import annotations

import math

import torch
from torch import nn

from paged.worker.layers.fused_cpu import FusedOps
from paged.worker.model_config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), adjusted for the scaling type exactly as transformers' modeling_rope_utils."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return llama3_scaled(inv_freq, scaling)


def llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin of position * inv_freq for every position up to max_positions, looked up per token."""

    fused: FusedOps | None = None  # set by LlamaForCausalLM.use_fused_ops on the native CPU backend

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        # Computed on the CPU in float32 whatever device and default dtype the model is built under: the
        # tables must be exact, and their dtype follows the query at lookup time.
        with torch.device("cpu"):
            inv_freq = inverse_frequencies(head_dim, theta, scaling)
            angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        # Half-width tables: the rotate-half form only ever multiplies each half by the same cos/sin.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate query [T, Hq, D] and key [T, Hkv, D] by their tokens' positions [T] (in place when fused)."""
        if self.fused is not None:
            return self.fused.rotary(positions, query, key, self.cos, self.sin)
        cos = self.cos[positions][:, None, :].to(query.dtype)
        sin = self.sin[positions][:, None, :].to(query.dtype)
        return rotate(query, cos, sin), rotate(key, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), written on the halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
