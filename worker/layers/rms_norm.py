"""RMSNorm as Llama defines it: normalize in float32, scale in the model's dtype."""

from __future__ import annotations

import torch
from torch import nn

from paged.worker.layers.fused_cpu import FusedOps


class RMSNorm(nn.Module):
    fused: FusedOps | None = None  # set by LlamaForCausalLM.use_fused_ops on the native CPU backend

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused.rms_norm(x, self.weight, self.eps)
        # float32 statistics keep bf16/fp16 models numerically identical to transformers.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def add_and_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + delta), residual + delta): the residual connection and the next norm in one
        pass on the fused path, which writes the sum into `residual` (a hidden state the model owns)."""
        if self.fused is not None:
            return self.fused.add_rms_norm(residual, delta, self.weight, self.eps)
        residual = residual + delta
        return self(residual), residual
