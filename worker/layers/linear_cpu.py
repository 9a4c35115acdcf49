"""The decoder's linear layers on the CPU in float32 as a native product over weights packed once at
load (worker/native/linear.cpp), in place of torch's MKL sgemm, which repacks each weight on every call.

The native CPU backend (worker/attention/cpu_ops.py) builds the library with its attention kernel and
the model loader swaps the decoder layers' nn.Linear modules for PackedLinear (float32 models only; the
LM head stays on torch: it runs once a step on the sampled rows). Measured on the 24M benchmark Llama's
layer shapes, one thread (docs/benchmarks.md): 1.2x MKL at a decode batch of 64, 1.3x at 8, level at a
2048-token prefill and at a single row (bound by reading the weights either way).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import nn

from paged.worker.native.compiler import load_library

SOURCE = Path(__file__).resolve().parent.parent / "native" / "linear.cpp"
PANEL = 64  # output columns per packed panel (linear.cpp)


class NativeLinear:
    """Bound to the built library: packs weights and multiplies by them."""

    def __init__(self, library: ctypes.CDLL) -> None:
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        library.pack_linear_weight.argtypes = [pointer, i64, i64, pointer]
        library.linear.argtypes = [pointer, i64, i64, i64, pointer, pointer, i64, pointer, ctypes.c_int]
        for function in (library.pack_linear_weight, library.linear):
            function.restype = ctypes.c_int
        self._lib = library

    @classmethod
    def build(cls) -> NativeLinear:
        """Compile (or find cached) and bind the library; raises NativeBuildError if it cannot be built."""
        return cls(load_library(SOURCE))

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """The [N, K] float32 weight as [ceil(N / 64), K, 64] column panels, zeros past N."""
        weight = _float32_cpu(weight, "weight").contiguous()
        out_features, in_features = weight.shape
        packed = torch.empty(-(-out_features // PANEL), in_features, PANEL)
        self._lib.pack_linear_weight(weight.data_ptr(), out_features, in_features, packed.data_ptr())
        return packed

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
        """x [..., K] @ weight^T (+ bias, padded to the panels) -> [..., out_features]."""
        in_features = packed.shape[1]
        if x.shape[-1] != in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer takes {in_features}")
        rows = _float32_cpu(x, "input").reshape(-1, in_features)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape[0], out_features)
        status = self._lib.linear(
            rows.data_ptr(), rows.shape[0], in_features, rows.stride(0), packed.data_ptr(),
            None if bias is None else bias.data_ptr(), out_features, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise ValueError("native linear rejected its arguments")
        return out.view(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """An nn.Linear whose weight lives only packed (the [N, K] original is dropped, so no memory is added)."""

    def __init__(self, linear: nn.Linear, native: NativeLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.native = native
        self.register_buffer("packed", native.pack(linear.weight.detach()), persistent=False)
        bias = None
        if linear.bias is not None:
            bias = torch.zeros(self.packed.shape[0] * PANEL)
            bias[: self.out_features] = _float32_cpu(linear.bias.detach(), "bias")
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.native(x, self.packed, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def _float32_cpu(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
        raise TypeError(f"the native linear takes a float32 CPU {what}, got {tensor.dtype} on {tensor.device}")
    return tensor


def pack_linear_layers(module: nn.Module, native: NativeLinear) -> None:
    """Replace every nn.Linear under `module` by a PackedLinear (float32 CPU weights only)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child, native))
