"""Per-step sampling tensors: one row per sequence that samples this step.

Built once per step from the Python-side parameters and (for penalties) each sequence's TokenHistory,
so that the sampler itself runs as a handful of batched tensor ops with no per-row Python. Every optional field is None when no
row in the batch needs it, which lets the common batch (plain greedy/temperature, no penalties, no
logprobs) skip the sort, the penalty tensors and the hashing entirely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from paged.shared.sampling_params import SamplingParams
from paged.worker.seeded_noise import as_int64
from paged.worker.token_history import TokenHistory, has_penalties


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
    """What the penalties change, as flat indices row * vocab_size + token into the [S, V] logits: only
    the logits of tokens a penalized row has seen are touched, so rows without penalties (and every
    other token) come out bit-identical."""

    # Repetition (HF/vLLM): every distinct prompt or output token of a row with a repetition penalty.
    seen_index: torch.Tensor | None  # int64 [N]
    seen_repetition: torch.Tensor | None  # float32 [N]: the row's repetition penalty
    # Presence/frequency (OpenAI): every distinct output token of a row with either penalty.
    output_index: torch.Tensor | None  # int64 [M]
    output_subtract: torch.Tensor | None  # float32 [M]: frequency * count + presence


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
        histories: Sequence[TokenHistory | None] | None = None,
    ) -> SamplingBatch:
        """Gather the batch's parameters into tensors on `device`.

        output_token_ids give the seeded rows their generation index. The penalties read `histories` (the
        worker keeps one per penalized sequence); without them they are built from the token lists, which
        are otherwise left unread.
        """
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
        if any(has_penalties(p) for p in params):
            if histories is None:
                histories = [
                    TokenHistory(prompt, output) if has_penalties(p) else None
                    for p, prompt, output in zip(params, prompt_token_ids, output_token_ids)
                ]
            penalties = _build_penalties(params, histories, vocab_size, device)

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


def _history(histories: Sequence[TokenHistory | None], row: int) -> TokenHistory:
    history = histories[row]
    if history is None:
        raise ValueError(f"row {row} has penalties but no token history")
    return history


def _flat_index(rows: list[int], ids: list[np.ndarray], vocab_size: int) -> np.ndarray:
    """row * vocab_size + token for every token of every listed row."""
    offsets = np.asarray(rows, dtype=np.int64) * vocab_size
    return np.concatenate(ids) + np.repeat(offsets, [len(row_ids) for row_ids in ids])


def _per_entry(values: list[float], ids: list[np.ndarray]) -> np.ndarray:
    """Each row's value, repeated once per token of the row."""
    return np.repeat(np.asarray(values, dtype=np.float32), [len(row_ids) for row_ids in ids])


def _build_penalties(
    params: list[SamplingParams], histories: Sequence[TokenHistory | None], vocab_size: int, device: torch.device | str
) -> Penalties:
    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device)

    seen_index = seen_repetition = output_index = output_subtract = None
    repeating = [row for row, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeating:
        ids = [_history(histories, row).seen_ids for row in repeating]
        seen_index = tensor(_flat_index(repeating, ids, vocab_size))
        seen_repetition = tensor(_per_entry([params[row].repetition_penalty for row in repeating], ids))
    counting = [row for row, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    if counting:
        ids = [_history(histories, row).output_ids for row in counting]
        counts = np.concatenate([_history(histories, row).output_counts for row in counting])
        frequency = _per_entry([params[row].frequency_penalty for row in counting], ids)
        presence = _per_entry([params[row].presence_penalty for row in counting], ids)
        output_index = tensor(_flat_index(counting, ids, vocab_size))
        output_subtract = tensor(frequency * counts + presence)
    return Penalties(seen_index, seen_repetition, output_index, output_subtract)
