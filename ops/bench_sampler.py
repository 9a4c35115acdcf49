"""Micro-benchmark of one sampling step: SamplingBatch.build and Sampler.__call__ for several
parameter mixes. Prints microseconds per step; asserts nothing. The figure is the fastest of the
repeats, not the median: on a shared machine the minimum is the closest estimate of the uncontended
cost, and the median mostly measures the neighbours.

    python -m paged.ops.bench_sampler [--batch 64] [--vocab 32000] [--prompt-len 512] [--output-len 128]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click
import torch

from paged.shared.sampling_params import SamplingParams
from paged.worker.sampler import Sampler
from paged.worker.sampling_batch import SamplingBatch
from paged.worker.token_history import TokenHistory


def _best_us(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


@click.command()
@click.option("--batch", default=64, show_default=True)
@click.option("--vocab", default=32000, show_default=True)
@click.option("--prompt-len", default=512, show_default=True)
@click.option("--output-len", default=128, show_default=True)
@click.option("--repeats", default=30, show_default=True)
def main(batch: int, vocab: int, prompt_len: int, output_len: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=gen)
    prompts = torch.randint(vocab, (batch, prompt_len), generator=gen).tolist()
    outputs = torch.randint(vocab, (batch, output_len), generator=gen).tolist()
    # The worker keeps each penalized sequence's history between steps: built once here, not per step.
    histories = [TokenHistory(prompt, output) for prompt, output in zip(prompts, outputs)]
    mixes = {
        "greedy": SamplingParams(temperature=0.0),
        "temperature": SamplingParams(temperature=0.8),
        "seeded temperature": SamplingParams(temperature=0.8, seed=1),
        "top_k+top_p+min_p": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
        "presence+frequency": SamplingParams(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5),
        "repetition": SamplingParams(temperature=0.8, repetition_penalty=1.1),
        "logprobs=5": SamplingParams(temperature=0.8, logprobs=5),
        "everything, seeded": SamplingParams(
            temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, seed=1,
            presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1, logprobs=5,
        ),
    }
    sampler = Sampler()
    print(f"batch {batch}, vocab {vocab}, prompt {prompt_len}, output {output_len} tokens/row, "
          f"torch threads {torch.get_num_threads()}; best-of-repeats us per step")
    print(f"{'mix':<22}{'build':>10}{'sample':>10}")
    for name, params in mixes.items():
        rows = [params] * batch

        def build(rows: list[SamplingParams] = rows) -> SamplingBatch:
            return SamplingBatch.build(rows, prompts, outputs, vocab, "cpu", histories)

        sampling_batch = build()
        build_us = _best_us(build, repeats)
        sample_us = _best_us(lambda: sampler(logits, sampling_batch), repeats)
        print(f"{name:<22}{build_us:>10.0f}{sample_us:>10.0f}")


if __name__ == "__main__":
    main()
