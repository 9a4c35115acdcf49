"""The element types the native CPU kernels take, by the code their C functions switch on
(`int dtype` in paged_attention.cpp and fused_ops.cpp: 0 float32, 1 bfloat16, 2 float16)."""

from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(what: str, *tensors: torch.Tensor) -> int:
    """The code of the tensors' one dtype; raises TypeError unless they are CPU tensors of one
    float32/bfloat16/float16 dtype (`what` names them in the message)."""
    dtype = tensors[0].dtype
    if dtype not in DTYPE_CODES or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
        raise TypeError(f"{what} must be CPU tensors of one float32/bfloat16/float16 dtype, got {[t.dtype for t in tensors]}")
    return DTYPE_CODES[dtype]
