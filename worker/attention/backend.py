"""Pick the paged-attention implementation: cpu (the native C++ kernel), torch (the CPU reference) or
Triton (CUDA)."""

from __future__ import annotations

import importlib
from typing import Literal, Protocol, cast

import torch

from paged.shared.logging import get_logger
from paged.worker.attention.metadata import AttentionMetadata
from paged.worker.native.compiler import NativeBuildError

log = get_logger("attention")

AttentionBackendName = Literal["cpu", "torch", "triton"]


class AttentionOps(Protocol):
    """What the model calls; worker.attention.cpu_ops, torch_ops and triton_ops all provide it."""

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
    """The ops module of a backend. Triton is imported only when asked for, so CPU-only installs never touch it.
    "cpu" builds the native kernel on first use; without a working C++ compiler it falls back to the torch
    path (same results, slower) with one warning."""
    if name == "cpu":
        from paged.worker.attention import cpu_ops

        try:
            cpu_ops.load()
        except NativeBuildError as exc:
            log.warning("native_attention_unavailable", fallback="torch", reason=str(exc))
            return cast(AttentionOps, importlib.import_module("paged.worker.attention.torch_ops"))
        return cast(AttentionOps, cpu_ops)
    if name == "torch":
        return cast(AttentionOps, importlib.import_module("paged.worker.attention.torch_ops"))
    if name == "triton":
        return cast(AttentionOps, importlib.import_module("paged.worker.attention.triton_ops"))
    raise ValueError(f"unknown attention backend {name!r}: expected 'cpu', 'torch' or 'triton'")
