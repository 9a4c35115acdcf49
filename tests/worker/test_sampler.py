"""Sampler: greedy and truncation edge cases, sampling frequencies, seeded determinism independent of
the batch, penalties and logprobs against straightforward per-row references, and a property test
that sampled tokens always lie in the set top-k/top-p/min-p allow."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paged.shared.sampling_params import SamplingParams
from paged.worker.sampler import Sampler, SamplerOutput, _apply_penalties
from paged.worker.sampling_batch import SamplingBatch
from paged.worker.seeded_noise import as_int64, seeded_uniform

sampler = Sampler()


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SamplerOutput:
    rows = len(params)
    batch = SamplingBatch.build(
        params, prompts or [[] for _ in range(rows)], outputs or [[] for _ in range(rows)], logits.shape[-1], "cpu"
    )
    return sampler(logits, batch)


def frequencies(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab_size).double() / tokens.numel()


def test_greedy_is_argmax_and_skips_optional_tensors() -> None:
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.3, seed=i) for i in range(8)]
    batch = SamplingBatch.build(params, [[]] * 8, [[]] * 8, 100, "cpu")
    # Truncation and seeds cannot change a greedy row's token, so nothing is built for them.
    assert batch.all_greedy and batch.top_k is None and batch.top_p is None and batch.seeded is None
    assert batch.penalties is None and batch.num_logprobs is None
    out = sampler(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_token_ids is None


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    for params in (SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6)):
        out = sample(logits, [params] * 64)
        assert torch.equal(out.token_ids, logits.argmax(-1)), params


def test_min_p_keeps_exactly_tokens_above_fraction_of_max() -> None:
    probs = torch.tensor([0.40, 0.25, 0.19, 0.10, 0.06])  # min_p 0.5 -> keep p >= 0.2: tokens 0, 1
    rows = 4000
    torch.manual_seed(0)
    out = sample(probs.log().expand(rows, -1).contiguous(), [SamplingParams(min_p=0.5)] * rows)
    freq = frequencies(out.token_ids, 5)
    expected = torch.tensor([0.40, 0.25, 0.0, 0.0, 0.0], dtype=torch.float64) / 0.65
    assert (freq - expected).abs().max() < 0.03, freq


def _assert_matches_softmax(params: list[SamplingParams], logits: torch.Tensor, expected: torch.Tensor) -> None:
    rows = len(params)
    out = sample(logits.expand(rows, -1).contiguous(), params)
    freq = frequencies(out.token_ids, logits.shape[-1])
    # 20k draws: the standard error of each frequency is below 0.0036, so 0.015 is > 4 sigma.
    assert (freq - expected.double()).abs().max() < 0.015, (freq, expected)


def test_temperature_sampling_matches_softmax_unseeded_and_seeded() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    expected = torch.softmax(logits / 0.7, dim=-1)
    rows = 20_000
    torch.manual_seed(0)
    _assert_matches_softmax([SamplingParams(temperature=0.7)] * rows, logits, expected)
    # The hashed noise must be as good as the generator's: one draw from each of 20k seeds...
    _assert_matches_softmax([SamplingParams(temperature=0.7, seed=s) for s in range(rows)], logits, expected)
    # ...and 20k successive generation indices of one seed (the race the sampler runs, on its noise).
    uniform = seeded_uniform(torch.full((rows,), 123), torch.arange(rows), 6)
    steps_tokens = (expected / -uniform.log()).argmax(-1)
    assert (frequencies(steps_tokens, 6) - expected.double()).abs().max() < 0.015


def test_top_k_and_top_p_renormalize_over_the_kept_tokens() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    torch.manual_seed(1)
    # top_p 0.7: 0.5 alone is short of 0.7, so {0, 1} is the smallest prefix reaching it.
    _assert_matches_softmax([SamplingParams(top_p=0.7)] * 20_000, probs.log(), torch.tensor([0.625, 0.375, 0, 0]))
    _assert_matches_softmax([SamplingParams(top_k=3)] * 20_000, probs.log(), torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95)
    # Both: top_p applies to the mass renormalized over the top-k ({0, 1, 2} -> 0.53, 0.32, 0.16).
    _assert_matches_softmax(
        [SamplingParams(top_k=3, top_p=0.8)] * 20_000, probs.log(), torch.tensor([0.625, 0.375, 0, 0])
    )


def test_seeded_row_ignores_batch_composition_and_position() -> None:
    vocab = 1000
    gen = torch.Generator().manual_seed(2)
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    for step in range(5):
        row_logits = torch.randn(vocab, generator=gen) * 0.5  # flat: the token is down to the noise
        output = list(range(step))  # generation index = step
        alone = sample(row_logits[None], [target], [[1]], [output]).token_ids[0]
        others = [
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.8, top_k=10, seed=7, presence_penalty=0.5),
            SamplingParams(min_p=0.05, logprobs=3),
        ]
        logits = torch.cat([torch.randn(3, vocab, generator=gen), row_logits[None]])
        for position in range(4):
            params = others[:position] + [target] + others[position:]
            batch_logits = torch.cat([logits[:position], row_logits[None], logits[position:3]])
            outputs = [[5, 6]] * position + [output] + [[9]] * (3 - position)
            got = sample(batch_logits, params, [[1]] * 4, outputs).token_ids[position]
            assert got == alone, (step, position)


def test_different_seeds_and_steps_give_different_tokens() -> None:
    logits = torch.zeros(1, 1000)
    by_seed = {int(sample(logits, [SamplingParams(seed=s)]).token_ids[0]) for s in range(20)}
    by_step = {int(sample(logits, [SamplingParams(seed=3)], [[]], [[0] * n]).token_ids[0]) for n in range(20)}
    assert len(by_seed) >= 18 and len(by_step) >= 18


def _splitmix_finalizer(z: int) -> int:
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_seeded_noise_matches_unsigned_splitmix64_reference() -> None:
    """Pins the noise bit for bit against plain Python integers, so a device or torch change that
    breaks the int64 wraparound/shift tricks shows up here instead of as silently different tokens."""
    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15
    for seed, step in [(0, 0), (42, 7), (-1, 3), (2**64 + 5, 1), (2**63, 100)]:
        uniform = seeded_uniform(torch.tensor([as_int64(seed)]), torch.tensor([step]), 4)[0]
        key = _splitmix_finalizer((_splitmix_finalizer(seed & mask) + step * golden) & mask)
        for vocab_id in range(4):
            bits = _splitmix_finalizer((key + (vocab_id + 1) * golden) & mask)
            assert uniform[vocab_id] == torch.tensor(((bits >> 40) + 0.5) / (1 << 24), dtype=torch.float32)


def _reference_penalties(
    logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]]
) -> torch.Tensor:
    result = logits.clone()
    for row, p in enumerate(params):
        for token in set(prompts[row]) | set(outputs[row]):
            value = result[row, token]
            result[row, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(outputs[row]):
            count = outputs[row].count(token)
            result[row, token] -= p.frequency_penalty * count + p.presence_penalty
    return result


def test_penalties_match_per_row_reference() -> None:
    vocab = 40
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, vocab, generator=gen) * 3
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, presence_penalty=0.7),
        SamplingParams(temperature=0.0, frequency_penalty=0.4, repetition_penalty=0.8),
        SamplingParams(temperature=0.0, presence_penalty=-0.5, frequency_penalty=1.1, repetition_penalty=2.0),
    ]
    prompts = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (3, 8, 0, 5, 12)]
    outputs = [torch.randint(vocab, (n,), generator=gen).tolist() for n in (4, 6, 9, 0, 15)]
    batch = SamplingBatch.build(params, prompts, outputs, vocab, "cpu")
    assert batch.penalties is not None
    expected = _reference_penalties(logits, params, prompts, outputs)
    torch.testing.assert_close(_apply_penalties(logits, batch.penalties), expected)
    # Greedy picks the argmax of the penalized logits.
    assert torch.equal(sampler(logits, batch).token_ids, expected.argmax(-1))


def test_logprobs_are_raw_log_softmax_with_sorted_top_n() -> None:
    vocab = 30
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(4))
    params = [
        SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=2),
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(top_k=3),  # asked for none: its row is still filled, the worker ignores it
    ]
    out = sample(logits, params, [[1, 2]] * 3, [[3]] * 3)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs is not None and out.top_token_ids is not None and out.top_logprobs is not None
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_token_ids.shape == (3, 5)
    assert torch.equal(out.top_token_ids, raw.argsort(dim=-1, descending=True)[:, :5])
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_token_ids))
    assert bool((out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all())

    zero = sample(logits, [SamplingParams(logprobs=0)] * 3)
    assert zero.top_token_ids is not None and zero.top_token_ids.shape == (3, 0) and zero.logprobs is not None


def _allowed_tokens(row_logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Per-row reference in float64 Python, following the sampler's order min-p -> top-k -> top-p. Ties
    with the last kept logit are allowed, and top_p gets a hair of slack for float32 cumsum rounding."""
    if p.temperature <= 0:
        return {int(row_logits.argmax())}
    scaled = [x / p.temperature for x in row_logits.double().tolist()]
    top = max(scaled)
    # p_i >= min_p * p_max, written on exp(logit - max) since the softmax normalizer cancels.
    kept = sorted(
        (i for i, x in enumerate(scaled) if math.exp(x - top) >= p.min_p * (1 - 1e-5)), key=lambda i: -scaled[i]
    )
    if 0 < p.top_k < len(kept):
        kept = [i for i in kept if scaled[i] >= scaled[kept[p.top_k - 1]]]
    if p.top_p < 1.0:
        weights = [math.exp(scaled[i] - top) for i in kept]
        total, mass_before, count = sum(weights), 0.0, 0
        for weight in weights:
            if mass_before >= p.top_p + 1e-4:
                break
            mass_before += weight / total
            count += 1
        kept = [i for i in kept if scaled[i] >= scaled[kept[count - 1]]]
    return set(kept)


row_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    top_k=st.integers(0, 12),
    top_p=st.floats(0.01, 1.0),
    min_p=st.sampled_from([0.0, 0.01, 0.2, 0.9]),
    seed=st.none() | st.integers(-(2**70), 2**70),
)


@settings(max_examples=60, deadline=None)
@given(
    params=st.lists(row_params, min_size=1, max_size=6),
    vocab=st.integers(2, 40),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    logits_seed=st.integers(0, 2**31),
)
def test_sampled_tokens_stay_within_allowed_set(
    params: list[SamplingParams], vocab: int, scale: float, logits_seed: int
) -> None:
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(logits_seed)) * scale
    for _ in range(3):
        tokens = sample(logits, params).token_ids
        for row, p in enumerate(params):
            assert int(tokens[row]) in _allowed_tokens(logits[row], p), (row, p)
