"""The decoder's element-wise layers on the CPU as one native pass each (worker/native/fused_ops.cpp):
RMSNorm (also fused with the residual add before it), rotary embedding in place, SiLU(gate) * up.

The native CPU backend (worker/attention/cpu_ops.py) builds one with its attention kernel, and the model
loader hands it to the model's layers; they call it instead of their torch code, which stays the
reference and serves every other backend and device. Measured on a 2048-token prefill step of the 24M
benchmark Llama (one thread): the torch versions (five to eight passes and temporaries each) took ~15%
of the step, the fused ones ~8%, most of it the memory-bound SiLU-mul; the step went from 836 to 682 ms.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from paged.worker.native.compiler import load_library
from paged.worker.native.dtypes import dtype_code

SOURCE = Path(__file__).resolve().parent.parent / "native" / "fused_ops.cpp"


class FusedOps:
    """Bound to the built library; every call takes contiguous-row CPU tensors of one dtype."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        signatures = {
            "rms_norm": [pointer] * 3 + [i64] * 4 + [f32, i32, i32],
            "add_rms_norm": [pointer] * 4 + [i64] * 3 + [f32, i32, i32],
            "rotary": [pointer] * 5 + [i64] * 9 + [i32, i32],
            "silu_mul": [pointer] * 3 + [i64] * 4 + [i32, i32],
        }
        for name, argtypes in signatures.items():
            function = getattr(library, name)
            function.argtypes = argtypes
            function.restype = ctypes.c_int
        self._lib = library

    @classmethod
    def build(cls) -> FusedOps:
        """Compile (or find cached) and bind the library; raises NativeBuildError if it cannot be built."""
        return cls(load_library(SOURCE))

    @staticmethod
    def _dtype(*tensors: torch.Tensor) -> int:
        return dtype_code("the fused CPU ops' tensors", *tensors)

    @staticmethod
    def _check(status: int, name: str) -> None:
        if status != 0:
            raise ValueError(f"native {name} rejected its arguments")

    @staticmethod
    def _check_weight(weight: torch.Tensor, hidden: int) -> None:
        if weight.shape != (hidden,) or weight.stride(0) != 1:
            raise ValueError(f"the norm weight must be a dense [{hidden}] tensor, got {list(weight.shape)}")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * x / sqrt(mean(x^2) + eps) over the last dimension."""
        self._check_weight(weight, x.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape, dtype=x.dtype)
        dtype = self._dtype(rows, weight)
        status = self._lib.rms_norm(
            rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0),
            out.stride(0), eps, dtype, torch.get_num_threads(),
        )  # fmt: skip
        self._check(status, "rms_norm")
        return out.view(x.shape)

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + delta), residual + delta); the sum is written into `residual`, which must be
        a dense [rows, hidden] tensor the caller owns (the decoder's running hidden state)."""
        if not residual.is_contiguous() or delta.stride(-1) != 1 or residual.dim() != 2 or delta.shape != residual.shape:
            raise ValueError("add_rms_norm needs a dense 2-D residual and a delta of its shape with dense rows")
        self._check_weight(weight, residual.shape[1])
        out = torch.empty_like(residual)
        status = self._lib.add_rms_norm(
            residual.data_ptr(), delta.data_ptr(), weight.data_ptr(), out.data_ptr(), residual.shape[0], residual.shape[1],
            delta.stride(0), eps, self._dtype(residual, delta, weight), torch.get_num_threads(),
        )  # fmt: skip
        self._check(status, "add_rms_norm")
        return out, residual

    def rotary(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate query [T, Hq, D] and key [T, Hkv, D] in place by the float32 half-width tables' rows at
        `positions` (each must be a row of the tables: the kernel checks)."""
        tokens, _, head_dim = query.shape
        if key.dim() != 3 or key.shape[0] != tokens or key.shape[2] != head_dim or positions.shape != (tokens,):
            shapes = [list(t.shape) for t in (query, key, positions)]
            raise ValueError(f"rotary needs query [T, Hq, D], key [T, Hkv, D] and positions [T], got {shapes}")
        if query.stride(-1) != 1 or key.stride(-1) != 1:
            raise ValueError("rotary needs dense head rows")
        if any(t.dtype != torch.float32 or not t.is_contiguous() or t.shape != cos.shape for t in (cos, sin)):
            raise ValueError("rotary needs contiguous float32 tables of one shape")
        if cos.dim() != 2 or 2 * cos.shape[1] != head_dim:
            raise ValueError(f"rotary tables {list(cos.shape)} do not cover half of head_dim {head_dim}")
        positions = positions.to(torch.int64).contiguous()
        status = self._lib.rotary(
            query.data_ptr(), key.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), cos.shape[0], tokens,
            query.shape[1], key.shape[1], head_dim, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            self._dtype(query, key), torch.get_num_threads(),
        )  # fmt: skip
        self._check(status, "rotary")
        return query, key

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for [rows, cols] tensors with dense rows."""
        if gate.stride(-1) != 1 or up.stride(-1) != 1 or gate.shape != up.shape or gate.dim() != 2:
            raise ValueError("silu_mul needs two [rows, cols] tensors of one shape with dense rows")
        out = torch.empty(gate.shape, dtype=gate.dtype)
        status = self._lib.silu_mul(
            gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.shape[0], gate.shape[1], gate.stride(0), up.stride(0),
            self._dtype(gate, up), torch.get_num_threads(),
        )  # fmt: skip
        self._check(status, "silu_mul")
        return out

