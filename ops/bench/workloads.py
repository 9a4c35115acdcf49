"""Synthetic workloads: prompt and output lengths from fixed-seed distributions, prompt tokens drawn from
the model's own vocabulary, so every model works offline and every run with the same seed is identical."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from paged.ops.bench.model_info import ModelInfo


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int]  # token ids, sent as is (the server adds no BOS to id prompts)
    max_tokens: int  # with ignore_eos every choice generates exactly this many tokens
    n: int = 1
    system_tokens: int = 0  # leading prompt tokens that are a system prompt other requests share
    kind: str = ""  # a class of requests the report also shows apart (long-prompt-mix: long-prompt, decode)


def system_prompts(specs: list[RequestSpec]) -> tuple[int, int]:
    """(distinct system prompts the requests open with, their tokens in all): a workload's prefix working set."""
    distinct = {tuple(spec.prompt[: spec.system_tokens]) for spec in specs if spec.system_tokens}
    return len(distinct), sum(len(system) for system in distinct)


def _lognormal_lengths(rng: np.random.Generator, median: float, sigma: float, low: int, high: int, size: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), sigma, size).round(), low, high).astype(int)


def _fit_to_context(prompt_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Clip so prompt + output fits the context window, giving the output at most half of it."""
    output_len = max(1, min(output_len, max_model_len // 2))
    return max(1, min(prompt_len, max_model_len - output_len)), output_len


def _tokens(rng: np.random.Generator, model: ModelInfo, length: int) -> list[int]:
    return rng.choice(np.asarray(model.token_ids), size=length).tolist()


def _sharegpt_like(rng: np.random.Generator, model: ModelInfo, num_requests: int, n: int) -> list[RequestSpec]:
    # ShareGPT conversations: long-tailed lengths, prompts ~10-2000 tokens (median a few hundred),
    # answers ~10-1000; a lognormal with these medians matches the shape well enough for load.
    prompt_lens = _lognormal_lengths(rng, 220, 1.0, 10, 2000, num_requests)
    output_lens = _lognormal_lengths(rng, 160, 0.9, 10, 1000, num_requests)
    specs = []
    for prompt_len, output_len in zip(prompt_lens, output_lens):
        prompt_len, output_len = _fit_to_context(int(prompt_len), int(output_len), model.max_model_len)
        specs.append(RequestSpec(_tokens(rng, model, prompt_len), output_len, n))
    return specs


def mixed(rng: np.random.Generator, model: ModelInfo, num_requests: int) -> list[RequestSpec]:
    return _sharegpt_like(rng, model, num_requests, n=1)


def parallel(rng: np.random.Generator, model: ModelInfo, num_requests: int) -> list[RequestSpec]:
    """n=4 sampling: the 4 choices share the prompt's blocks (copy-on-write on the first divergent write)."""
    return _sharegpt_like(rng, model, num_requests, n=4)


ZIPF_EXPONENT = 1.0  # popularity of the i-th most asked system prompt ∝ 1/i: a few hot ones, a long tail


def shared_prefix(
    rng: np.random.Generator, model: ModelInfo, num_requests: int, working_set_tokens: int = 0
) -> list[RequestSpec]:
    """Requests that open with a system prompt and add a user turn. Without `working_set_tokens`,
    one long system prompt (half the context window, at most 1000 tokens) shared by every request.
    With it, distinct system prompts of varied length (lognormal, 16 tokens to that maximum) adding
    up to that many tokens, asked with Zipf popularity: a KV pool smaller than the working set must
    evict, which is where a KV store tier and the eviction policies make their difference."""
    longest = min(1000, model.max_model_len // 2)
    if working_set_tokens <= 0:
        systems = [_tokens(rng, model, longest)]
    else:
        systems = []
        total = 0
        while total < working_set_tokens:
            length = int(_lognormal_lengths(rng, longest / 2, 0.5, 16, longest, 1)[0])
            systems.append(_tokens(rng, model, length))
            total += length
    popularity = 1.0 / (rng.permutation(len(systems)) + 1.0) ** ZIPF_EXPONENT if len(systems) > 1 else None
    specs = []
    for _ in range(num_requests):
        system = systems[0] if popularity is None else systems[int(rng.choice(len(systems), p=popularity / popularity.sum()))]
        user_len, output_len = _fit_to_context(
            int(rng.integers(16, 80)), int(rng.integers(16, 128)), model.max_model_len - len(system)
        )
        specs.append(RequestSpec(system + _tokens(rng, model, user_len), output_len, system_tokens=len(system)))
    return specs


def long(rng: np.random.Generator, model: ModelInfo, num_requests: int) -> list[RequestSpec]:
    """Contexts of 75-90% of the window: few fit at once, so this stresses the KV pool, not the batch."""
    specs = []
    for _ in range(num_requests):
        total = int(model.max_model_len * rng.uniform(0.75, 0.9))
        output_len = max(1, min(256, total // 8))
        specs.append(RequestSpec(_tokens(rng, model, total - output_len), output_len))
    return specs


LONG_PROMPT_EVERY = 4  # long-prompt-mix: every fourth request


def long_prompt_mix(rng: np.random.Generator, model: ModelInfo, num_requests: int) -> list[RequestSpec]:
    """Prefill bursts among steady decodes, the load prefill/decode disaggregation is for
    (docs/disaggregation.md): every fourth request a long prompt (1400-1600 tokens) with a short
    answer (8-16 tokens), the others short prompts (32-128) that decode 96-192 tokens. On a mixed
    worker each long prompt's prefill step stalls every decode of its batch."""
    specs = []
    for index in range(num_requests):
        if index % LONG_PROMPT_EVERY == LONG_PROMPT_EVERY - 1:
            kind, prompt_len, output_len = "long-prompt", int(rng.integers(1400, 1601)), int(rng.integers(8, 17))
        else:
            kind, prompt_len, output_len = "decode", int(rng.integers(32, 129)), int(rng.integers(96, 193))
        prompt_len, output_len = _fit_to_context(prompt_len, output_len, model.max_model_len)
        specs.append(RequestSpec(_tokens(rng, model, prompt_len), output_len, kind=kind))
    return specs


WORKLOADS: dict[str, Callable[[np.random.Generator, ModelInfo, int], list[RequestSpec]]] = {
    "mixed": mixed,
    "shared-prefix": shared_prefix,
    "parallel": parallel,
    "long": long,
    "long-prompt-mix": long_prompt_mix,
}


def build_workload(name: str, model: ModelInfo, num_requests: int, seed: int, prefix_working_set_tokens: int = 0) -> list[RequestSpec]:
    """The workload's requests; `prefix_working_set_tokens` sizes shared-prefix's distinct system prompts."""
    rng = np.random.default_rng(seed)
    if name == "shared-prefix":
        return shared_prefix(rng, model, num_requests, prefix_working_set_tokens)
    return WORKLOADS[name](rng, model, num_requests)


def arrival_times(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Open-loop Poisson arrivals (exponential gaps), seconds from the start; rate inf sends all at once."""
    if request_rate == float("inf"):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / request_rate, num_requests)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()
