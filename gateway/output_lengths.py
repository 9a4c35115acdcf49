"""How much of its max_tokens a sequence really generates, learned online from finished sequences.

Clients ask for max_tokens far above what they use (ShareGPT-like traffic: up to 1024, median
~120), so reserving max_tokens per sequence admits a fraction of what fits, while reserving
nothing over-commits the pool. The model learns the distribution of the used share
R = output tokens / max output tokens (max_tokens, or less where the context window ends first):
one distribution serves requests with any max_tokens, and a request that always runs to its
limit (ignore_eos) has R = 1.

Estimator: Kaplan-Meier over the last `window` finished sequences (events) and the sequences
running when it is refreshed (censored: each has survived its share so far). Without the censored
ones the first estimates after a start would see only the short sequences that finished first,
and admit too much. The answer is a table S[k] = P(R > k / resolution), k = 0..resolution, which
the demand forecast indexes (gateway/demand_forecast.py); it is refreshed when a sixteenth of the
window is new, so its cost (a sort of a few thousand numbers) is paid rarely.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

DEFAULT_WINDOW = 2000
MIN_SAMPLES = 32  # below this, sequences are assumed to use all of max_tokens
DEFAULT_RESOLUTION = 1024  # table points: exact per token for max_tokens up to this


def used_shares(generated: Iterable[int], max_output: Iterable[int]) -> np.ndarray:
    """Each running sequence's used share of its max output tokens so far (those with a positive
    limit): the censored observations the model is refreshed with."""
    return np.array([g / m for g, m in zip(generated, max_output, strict=True) if m > 0], dtype=np.float64)


def kaplan_meier(events: np.ndarray, censored: np.ndarray, points: np.ndarray) -> np.ndarray:
    """P(R > x) at each of `points`, from observed values of R (`events`) and lower bounds
    (`censored`: R > c). A censored value c is at risk at every x <= c."""
    times, deaths = np.unique(events, return_counts=True)
    events_sorted = np.sort(events)
    censored_sorted = np.sort(censored)
    at_risk = (len(events_sorted) - np.searchsorted(events_sorted, times, side="left")) + (
        len(censored_sorted) - np.searchsorted(censored_sorted, times, side="left")
    )
    survival = np.concatenate(([1.0], np.cumprod(1.0 - deaths / at_risk)))
    return survival[np.searchsorted(times, points, side="right")]


class OutputLengthModel:
    def __init__(
        self, window: int = DEFAULT_WINDOW, min_samples: int = MIN_SAMPLES, resolution: int = DEFAULT_RESOLUTION
    ) -> None:
        self.resolution = resolution
        self._min_samples = min_samples
        self._finished: deque[float] = deque(maxlen=window)
        self._points = np.arange(resolution + 1) / resolution
        self._table: np.ndarray | None = None
        self._new_since_refresh = 0

    @property
    def num_samples(self) -> int:
        return len(self._finished)

    def observe(self, output_tokens: int, max_output_tokens: int) -> None:
        """A sequence ended by a stop token or its length limit after `output_tokens` tokens."""
        self._finished.append(min(1.0, output_tokens / max_output_tokens) if max_output_tokens > 0 else 1.0)
        self._new_since_refresh += 1

    def needs_refresh(self) -> bool:
        return self._table is None or self._new_since_refresh * 16 >= len(self._finished)

    def survival(self, running_shares: np.ndarray | None = None) -> np.ndarray | None:
        """The table S[k] = P(R > k / resolution), or None while fewer than `min_samples` sequences
        have finished. `running_shares` (used share of the running sequences, censored) is read
        only when the table is refreshed: pass it when needs_refresh()."""
        if len(self._finished) < self._min_samples:
            return None
        if self.needs_refresh():
            censored = running_shares if running_shares is not None else np.empty(0)
            table = kaplan_meier(np.fromiter(self._finished, float, len(self._finished)), censored, self._points)
            table[-1] = 0.0  # P(R > 1): none, though sequences censored at their limit leave KM above 0 there
            self._table = table
            self._new_since_refresh = 0
        return self._table

    def mean_share(self, running_shares: np.ndarray | None = None) -> float | None:
        """The expected used share E[R] (for the admin views), or None while too few sequences have
        finished. The table is refreshed first when it is due, as in survival(): without that the
        figure would wait for the next admission decision, and an idle pool would show a stale one."""
        table = self.survival(running_shares)
        return None if table is None else float(table[:-1].mean())
