"""The native CPU linear layer (worker/native/linear.cpp over weights packed by worker/layers/linear_cpu.py)
against torch's F.linear.

The kernel takes rows six at a time (tails of 1..5), 64-column panels (zeros past N), any K, an optional
bias, strided input rows, and splits panels between threads; the shapes below cross each of those.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from paged.worker.attention import cpu_ops
from paged.worker.layers.linear_cpu import PackedLinear, pack_linear_layers
from paged.worker.native.compiler import NativeBuildError
from support.torch_threads import with_threads

try:
    native = cpu_ops.native_linear()
except NativeBuildError as exc:  # pragma: no cover - machines with a compiler run these tests
    pytest.skip(f"the native kernels cannot be built here: {exc}", allow_module_level=True)


def make_linear(in_features: int, out_features: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 64, 131])
@pytest.mark.parametrize("in_features,out_features", [(8, 1), (64, 64), (100, 200), (512, 1408), (17, 65)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_torch(rows: int, in_features: int, out_features: int, bias: bool) -> None:
    linear = make_linear(in_features, out_features, bias)
    x = torch.randn(rows, in_features)
    expected = F.linear(x, linear.weight, linear.bias)
    torch.testing.assert_close(PackedLinear(linear, native)(x), expected, atol=1e-5, rtol=1e-5)


def test_leading_dims_and_strided_rows() -> None:
    """[B, T, K] inputs keep their leading shape; a column slice of a wider tensor is read in place."""
    linear = make_linear(48, 80, bias=True)
    wide = torch.randn(3, 5, 96)
    x = wide[..., 10:58]
    assert not x.is_contiguous()
    out = PackedLinear(linear, native)(x)
    assert out.shape == (3, 5, 80)
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)


def test_no_rows() -> None:
    assert PackedLinear(make_linear(16, 32, bias=False), native)(torch.empty(0, 16)).shape == (0, 32)


def test_a_row_does_not_depend_on_the_batch() -> None:
    """Each output is one ordered sum over K: a row's result is bit-identical alone, in any block of six,
    in any batch size and with any number of threads."""
    layer = PackedLinear(make_linear(512, 300, bias=True), native)
    x = torch.randn(67, 512)
    whole = with_threads(1, lambda: layer(x))
    torch.testing.assert_close(with_threads(3, lambda: layer(x)), whole, atol=0, rtol=0)
    for start, stop in ((0, 1), (5, 6), (3, 10), (60, 67)):
        torch.testing.assert_close(layer(x[start:stop]), whole[start:stop], atol=0, rtol=0)


def test_rejects_what_it_cannot_run() -> None:
    layer = PackedLinear(make_linear(16, 32, bias=False), native)
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="float32"):
        layer(torch.randn(2, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float32"):
        PackedLinear(make_linear(16, 32, bias=False).to(torch.float16), native)


def test_pack_linear_layers_replaces_every_linear() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    x = torch.randn(3, 8)
    expected = model(x)
    pack_linear_layers(model, native)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 2
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 300), st.integers(1, 300), st.booleans(), st.integers(0, 2**16))
def test_random_shapes_match_torch(rows: int, in_features: int, out_features: int, bias: bool, seed: int) -> None:
    linear = make_linear(in_features, out_features, bias, seed)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(PackedLinear(linear, native)(x), F.linear(x, linear.weight, linear.bias), atol=1e-5, rtol=1e-5)
