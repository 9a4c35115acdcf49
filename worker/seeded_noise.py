"""Counter-based uniform noise for seeded sampling.

A seeded request must draw the same token from the same logits whatever else shares its batch and
whichever row it lands in. A stateful generator cannot promise that (its stream depends on how many
numbers were drawn before), so each noise value is a pure function of (seed, generation index,
vocab id): splitmix64's finalizer applied to a counter, computed with int64 tensor ops so it runs
vectorized on any device and gives bit-identical results on CPU and GPU.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def as_int64(value: int) -> int:
    """Any Python int (a seed may be negative or wider than 64 bits, a constant unsigned) reduced
    modulo 2^64 and read as the signed int64 torch stores; the hash only sees those 64 bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = as_int64(0x9E3779B97F4A7C15)  # splitmix64's counter increment (odd, so the stream never cycles early)
_MIX1 = as_int64(0xBF58476D1CE4E5B9)
_MIX2 = as_int64(0x94D049BB133111EB)


def _shift_xor_(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z ^= z >>> bits (logical shift), in place: the hash runs over [R, V] int64, so every avoided
    temporary is a full pass of memory traffic saved."""
    # torch's >> on int64 is arithmetic; masking off the copied sign bits makes it logical.
    return z.bitwise_xor_((z >> bits).bitwise_and_((1 << (64 - bits)) - 1))


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer, in place: a bijection on 64-bit words with full avalanche. int64 products wrap."""
    _shift_xor_(z, 30).mul_(_MIX1)
    _shift_xor_(z, 27).mul_(_MIX2)
    return _shift_xor_(z, 31)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform float32 noise in (0, 1) of shape [R, vocab_size], row r a function of (seeds[r], steps[r]).

    seeds, steps: int64 [R]. Two rounds of mixing: one per row derives an independent stream key from
    (seed, step), one per element hashes (key, vocab id), exactly splitmix64's "key + i * golden" stream.
    """
    row_key = _mix_(_mix_(seeds.clone()).add_(steps * _GOLDEN))
    bits = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device).mul_(_GOLDEN)
    bits = _mix_(bits[None, :] + row_key[:, None])
    # The top 24 bits fit a float32 mantissa exactly; the +0.5 keeps u strictly inside (0, 1), so
    # -log(u) is finite and positive.
    top24 = (bits >> 40).bitwise_and_((1 << 24) - 1).to(torch.float32)
    return top24.add_(0.5).mul_(1.0 / (1 << 24))
