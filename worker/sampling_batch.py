"""Per-step sampling tensors: one row per sequence that samples this step.

Built once per step from the Python-side parameters and token lists, so that the sampler itself
runs as a handful of batched tensor ops with no per-row Python. Every optional field is None when no
row in the batch needs it, which lets the common batch (plain greedy/temperature, no penalties, no
logprobs) skip the sort, the penalty tensors and the hashing entirely.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from paged.shared.sampling_params import SamplingParams
from paged.worker.seeded_noise import as_int64


def check_sampling(params: SamplingParams, vocab_size: int) -> None:
    """Refuse (ValueError) a sequence whose sampling values this batch could not honour: the HTTP
    API checks them, but whatever reaches a worker another way fails that sequence alone. Without
    this, a top-logprobs count beyond the vocabulary fails the whole batch's sampling."""
    if params.logprobs is not None and not 0 <= params.logprobs <= vocab_size:
        raise ValueError(f"logprobs={params.logprobs} outside 0..{vocab_size}")
    for name in ("temperature", "presence_penalty", "frequency_penalty"):
        if math.isnan(getattr(params, name)):
            raise ValueError(f"{name} is NaN")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p={params.top_p} outside (0, 1]")
    if not 0 <= params.min_p <= 1:
        raise ValueError(f"min_p={params.min_p} outside [0, 1]")
    if not params.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={params.repetition_penalty} must be > 0")


@dataclass(frozen=True, slots=True)
class Penalties:
    """What presence/frequency/repetition penalties need. Rows without a penalty carry neutral values
    (0, 0, 1), which leave their logits unchanged."""

    presence: torch.Tensor  # float32 [S]
    frequency: torch.Tensor  # float32 [S]
    repetition: torch.Tensor  # float32 [S]
    output_counts: torch.Tensor  # float32 [S, V]: occurrences of each vocab id among the row's output tokens
    # bool [S, V]: vocab id occurs in the row's prompt or output; None when no row has a repetition penalty.
    seen: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class SeededRows:
    """The random rows that carry a seed; their noise comes from the hash, not the global generator."""

    rows: torch.Tensor  # int64 [R]: row indices in the batch
    seeds: torch.Tensor  # int64 [R]
    steps: torch.Tensor  # int64 [R]: generation index = tokens generated so far


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    greedy: torch.Tensor  # bool [S]: temperature <= 0, take the argmax of the penalized logits
    all_greedy: bool
    temperature: torch.Tensor  # float32 [S]; 1.0 on greedy rows so dividing by it is harmless
    top_k: torch.Tensor | None  # int64 [S], vocab_size where disabled; None if no row uses top-k
    truncation_width: int  # how many of the largest logits top-k/top-p can keep: max top-k, or vocab_size
    top_p: torch.Tensor | None  # float32 [S], 1.0 where disabled; None if no row uses top-p
    min_p: torch.Tensor | None  # float32 [S], 0.0 where disabled; None if no row uses min-p
    seeded: SeededRows | None
    penalties: Penalties | None
    num_logprobs: int | None  # max requested top logprobs; None if no row asked for logprobs

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        """Gather the batch's parameters into tensors on `device`.

        prompt_token_ids / output_token_ids are only read when some row has a penalty; the worker can
        pass its per-sequence token lists as they are, without copying.
        """
        num_rows = len(params)

        greedy_flags = [p.temperature <= 0.0 for p in params]
        temperatures = [1.0 if g else p.temperature for p, g in zip(params, greedy_flags)]

        # Truncation is meaningless for greedy rows; leaving it off there lets an all-greedy batch skip it.
        random_params = [p for p, g in zip(params, greedy_flags) if not g]
        top_k = top_p = min_p = None
        truncation_width = vocab_size
        if any(0 < p.top_k < vocab_size for p in random_params):
            # Greedy rows get k = 1 (their token is the argmax anyway) so that they do not stop the
            # sampler from sorting only the top max(k) logits when every random row has a top-k.
            row_k = [
                1 if g else p.top_k if 0 < p.top_k < vocab_size else vocab_size for p, g in zip(params, greedy_flags)
            ]
            top_k = _row_tensor(row_k, torch.int64, device)
            truncation_width = max(row_k)
        if any(p.top_p < 1.0 for p in random_params):
            top_p = _row_tensor([p.top_p for p in params], torch.float32, device)
        if any(p.min_p > 0.0 for p in random_params):
            min_p = _row_tensor([p.min_p for p in params], torch.float32, device)

        row_seeds = [(i, p.seed) for i, (p, g) in enumerate(zip(params, greedy_flags)) if p.seed is not None and not g]
        seeded = None
        if row_seeds:
            seeded = SeededRows(
                rows=_row_tensor([i for i, _ in row_seeds], torch.int64, device),
                seeds=_row_tensor([as_int64(seed) for _, seed in row_seeds], torch.int64, device),
                steps=_row_tensor([len(output_token_ids[i]) for i, _ in row_seeds], torch.int64, device),
            )

        penalties = None
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0 for p in params):
            penalties = _build_penalties(params, prompt_token_ids, output_token_ids, num_rows, vocab_size, device)

        requested = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            greedy=_row_tensor(greedy_flags, torch.bool, device),
            all_greedy=all(greedy_flags),
            temperature=_row_tensor(temperatures, torch.float32, device),
            top_k=top_k,
            truncation_width=truncation_width,
            top_p=top_p,
            min_p=min_p,
            seeded=seeded,
            penalties=penalties,
            num_logprobs=max(requested) if requested else None,
        )


def _row_tensor(
    values: list[float] | list[int] | list[bool], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _flat_indices(token_lists: list[list[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """Positions row * vocab_size + token in a flattened [S, V] tensor, for every token of every row."""
    lengths = [len(tokens) for tokens in token_lists]
    # np.fromiter reads the ints straight out of the lists, about 10x faster than torch.tensor(list)
    # on the tens of thousands of prompt tokens a repetition-penalty batch carries.
    tokens = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=sum(lengths))
    row_starts = np.repeat(np.arange(len(token_lists), dtype=np.int64) * vocab_size, lengths)
    return torch.from_numpy(tokens + row_starts).to(device)


def _build_penalties(
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    num_rows: int,
    vocab_size: int,
    device: torch.device | str,
) -> Penalties:
    # Only the flat index lists cross to the device; the [S, V] tensors are filled there. index_add_ and
    # index_fill_ on the flattened view avoid the sort that index_put_ does for 2-D or accumulating puts.
    output_positions = _flat_indices(output_token_ids, vocab_size, device)
    output_counts = torch.zeros(num_rows, vocab_size, dtype=torch.float32, device=device)
    output_counts.view(-1).index_add_(0, output_positions, torch.ones(len(output_positions), device=device))

    seen = None
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = output_counts > 0
        seen.view(-1).index_fill_(0, _flat_indices(prompt_token_ids, vocab_size, device), True)

    return Penalties(
        presence=_row_tensor([p.presence_penalty for p in params], torch.float32, device),
        frequency=_row_tensor([p.frequency_penalty for p in params], torch.float32, device),
        repetition=_row_tensor([p.repetition_penalty for p in params], torch.float32, device),
        output_counts=output_counts,
        seen=seen,
    )
