"""Pick the paged-attention implementation: torch (CPU, reference) or Triton (CUDA)."""

from __future__ import annotations

import importlib
from typing import Literal, Protocol, cast

import torch

from paged.worker.attention.metadata import AttentionMetadata

AttentionBackendName = Literal["torch", "triton"]


class AttentionOps(Protocol):
    """What the model calls; worker.attention.torch_ops and worker.attention.triton_ops both provide it."""

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def paged_attention(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...


def get_attention_ops(name: AttentionBackendName) -> AttentionOps:
    """The ops module of a backend. Triton is imported only when asked for, so CPU-only installs never touch it."""
    if name == "torch":
        return cast(AttentionOps, importlib.import_module("paged.worker.attention.torch_ops"))
    if name == "triton":
        return cast(AttentionOps, importlib.import_module("paged.worker.attention.triton_ops"))
    raise ValueError(f"unknown attention backend {name!r}: expected 'torch' or 'triton'")
