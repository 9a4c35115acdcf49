"""What the sampler's penalties need to know about one sequence's tokens, kept up to date one appended
token at a time: the distinct tokens it has seen (prompt and output: the repetition penalty) and how
often it generated each (presence and frequency penalties).

The arrays grow in place (doubling), so a step reads every penalized row's distinct tokens as ready
numpy views and the sampler touches only those logits, instead of rebuilding [rows, vocab] masks and
counts from every token of every sequence each step (at 256 rows of 2000 tokens and a 32000-token
vocabulary that rebuild alone took 23 ms a step, and the dense penalty arithmetic another ~70 ms).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from paged.shared.sampling_params import SamplingParams

INITIAL_CAPACITY = 16


def has_penalties(params: SamplingParams) -> bool:
    return params.presence_penalty != 0.0 or params.frequency_penalty != 0.0 or params.repetition_penalty != 1.0


class _GrowingArray:
    """A 1-D numpy array with amortized O(1) append."""

    def __init__(self, dtype: type, values: Sequence[float] = ()) -> None:
        self._data = np.empty(max(INITIAL_CAPACITY, 2 * len(values)), dtype=dtype)
        self._data[: len(values)] = values
        self.size = len(values)

    def append(self, value: float) -> None:
        if self.size == len(self._data):
            self._data = np.concatenate([self._data, np.empty_like(self._data)])
        self._data[self.size] = value
        self.size += 1

    def increment(self, index: int) -> None:
        self._data[index] += 1

    def view(self) -> np.ndarray:
        return self._data[: self.size]

    def copy(self) -> _GrowingArray:
        clone = _GrowingArray.__new__(_GrowingArray)
        clone._data, clone.size = self._data.copy(), self.size
        return clone


class TokenHistory:
    def __init__(self, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int]) -> None:
        self._seen = set(prompt_token_ids)
        self._seen_ids = _GrowingArray(np.int64, list(self._seen))
        self._output_slot: dict[int, int] = {}  # token -> its index in the two output arrays
        self._output_ids = _GrowingArray(np.int64)
        self._output_counts = _GrowingArray(np.float32)
        for token in output_token_ids:
            self.append(token)

    def append(self, token: int) -> None:
        if token not in self._seen:
            self._seen.add(token)
            self._seen_ids.append(token)
        slot = self._output_slot.get(token)
        if slot is None:
            self._output_slot[token] = self._output_ids.size
            self._output_ids.append(token)
            self._output_counts.append(1.0)
        else:
            self._output_counts.increment(slot)

    @property
    def seen_ids(self) -> np.ndarray:
        """int64: every distinct token of the prompt and the output, in no particular order."""
        return self._seen_ids.view()

    @property
    def output_ids(self) -> np.ndarray:
        """int64: every distinct generated token."""
        return self._output_ids.view()

    @property
    def output_counts(self) -> np.ndarray:
        """float32: how often each of output_ids was generated."""
        return self._output_counts.view()

    def copy(self) -> TokenHistory:
        clone = TokenHistory.__new__(TokenHistory)
        clone._seen = set(self._seen)
        clone._seen_ids = self._seen_ids.copy()
        clone._output_slot = dict(self._output_slot)
        clone._output_ids = self._output_ids.copy()
        clone._output_counts = self._output_counts.copy()
        return clone
