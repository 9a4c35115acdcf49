"""The fused native element-wise layers (worker/native/fused_ops.cpp) against the torch code they replace:
RMSNorm, the residual add fused into RMSNorm, rotary embedding and SiLU(gate) * up, in float32 (a few ulp
apart: summation order and fused multiply-adds), bfloat16 and float16 (rounded where torch rounds, so at
most one unit in the last place apart)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paged.worker.layers.fused_cpu import FusedOps
from paged.worker.layers.rms_norm import RMSNorm
from paged.worker.layers.rotary import RotaryEmbedding
from paged.worker.native.compiler import NativeBuildError

try:
    FUSED = FusedOps.build()
except NativeBuildError as exc:  # pragma: no cover - machines with a compiler run these tests
    pytest.skip(f"the native ops cannot be built here: {exc}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# float32: a few ulp; bf16/fp16: one unit in the last place of the result.
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2**-7), torch.float16: dict(atol=1e-3, rtol=2**-10)}


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [8, 64, 100])
def test_rms_norm_matches_torch(dtype: torch.dtype, hidden: int) -> None:
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(hidden, dtype=dtype, seed=1))
    x = randn(7, hidden, dtype=dtype, seed=2) * 3
    expected = norm(x)
    torch.testing.assert_close(FUSED.rms_norm(x, norm.weight, norm.eps), expected, **TOLERANCE[dtype])
    # Rows of a wider tensor (strided), and a 3-D input (qk-norm's [T, H, D]).
    wide = torch.cat([x, torch.zeros_like(x)], dim=1)[:, :hidden]
    torch.testing.assert_close(FUSED.rms_norm(wide, norm.weight, norm.eps), expected, **TOLERANCE[dtype])
    torch.testing.assert_close(FUSED.rms_norm(x.view(7, 1, hidden), norm.weight, norm.eps), expected.view(7, 1, hidden), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual_and_normalizes_the_sum(dtype: torch.dtype) -> None:
    norm = RMSNorm(80, 1e-6).to(dtype)
    residual, delta = randn(5, 80, dtype=dtype, seed=3), randn(5, 80, dtype=dtype, seed=4)
    expected_sum = residual + delta
    expected = norm(expected_sum)
    normed, summed = FUSED.add_rms_norm(residual.clone(), delta, norm.weight, norm.eps)
    assert torch.equal(summed, expected_sum)  # torch's add rounds once, as the fused add does
    torch.testing.assert_close(normed, expected, **TOLERANCE[dtype])


def test_add_and_norm_is_the_same_on_both_paths() -> None:
    norm = RMSNorm(64, 1e-5)
    residual, delta = randn(3, 64, dtype=torch.float32, seed=5), randn(3, 64, dtype=torch.float32, seed=6)
    reference = norm.add_and_norm(residual, delta)
    norm.fused = FUSED
    fused = norm.add_and_norm(residual.clone(), delta)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 64, 24])
def test_rotary_matches_torch(dtype: torch.dtype, head_dim: int) -> None:
    rotary = RotaryEmbedding(head_dim, 300, 10000.0, None)
    positions = torch.tensor([0, 5, 299, 17, 17, 128])
    # Q and K as strided views into one fused projection output, as a model may hand them over.
    fused_projection = randn(6, 8 + 2 + 3, head_dim, dtype=dtype, seed=7)
    query, key = fused_projection[:, :8], fused_projection[:, 8:10]
    expected_q, expected_k = rotary(positions, query.clone(), key.clone())
    got_q, got_k = FUSED.rotary(positions, query, key, rotary.cos, rotary.sin)
    assert got_q.data_ptr() == query.data_ptr()  # in place
    torch.testing.assert_close(got_q, expected_q, **TOLERANCE[dtype])
    torch.testing.assert_close(got_k, expected_k, **TOLERANCE[dtype])
    assert torch.equal(fused_projection[:, 10:], randn(6, 13, head_dim, dtype=dtype, seed=7)[:, 10:])  # untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [16, 100])
def test_silu_mul_matches_torch(dtype: torch.dtype, cols: int) -> None:
    # Large magnitudes both ways: the sigmoid must neither overflow nor lose the sign.
    gate = randn(9, cols, dtype=dtype, seed=8) * 12
    up = randn(9, cols, dtype=dtype, seed=9)
    torch.testing.assert_close(FUSED.silu_mul(gate, up), F.silu(gate) * up, **TOLERANCE[dtype])


def test_rejects_mixed_dtypes() -> None:
    with pytest.raises(TypeError):
        FUSED.silu_mul(torch.zeros(2, 16), torch.zeros(2, 16, dtype=torch.bfloat16))


def test_rejects_arguments_it_would_misread() -> None:
    """Raw pointers go to native code: sizes that disagree (a weight shorter than the rows, a delta of
    another shape, rotary tables narrower than half the head or with too few positions, a sin table of
    another dtype, a key with fewer tokens) are refused instead of read past."""
    x, weight = torch.zeros(4, 64), torch.ones(64)
    rotary = RotaryEmbedding(64, 16, 10000.0, None)
    query, key, positions = torch.zeros(3, 4, 64), torch.zeros(3, 2, 64), torch.tensor([0, 1, 2])
    narrow = RotaryEmbedding(32, 16, 10000.0, None)
    calls = [
        lambda: FUSED.rms_norm(x, weight[:32], 1e-5),
        lambda: FUSED.add_rms_norm(x.clone(), torch.zeros(4, 32), weight, 1e-5),
        lambda: FUSED.add_rms_norm(x.clone(), torch.zeros(2, 64), weight, 1e-5),
        lambda: FUSED.add_rms_norm(x.clone(), x, weight[:32], 1e-5),
        lambda: FUSED.rotary(torch.tensor([0, 1, 16]), query, key, rotary.cos, rotary.sin),
        lambda: FUSED.rotary(torch.tensor([0, -1, 2]), query, key, rotary.cos, rotary.sin),
        lambda: FUSED.rotary(positions, query, key, narrow.cos, narrow.sin),
        lambda: FUSED.rotary(positions, query, key, rotary.cos, rotary.sin.double()),
        lambda: FUSED.rotary(positions, query, key[:2], rotary.cos, rotary.sin),
        lambda: FUSED.rotary(positions[:2], query, key, rotary.cos, rotary.sin),
    ]
    for number, call in enumerate(calls):
        with pytest.raises((TypeError, ValueError)):
            call()
            pytest.fail(f"call {number} was not refused")
