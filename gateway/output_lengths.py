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
and admit too much. Past the longest share seen to end, where Kaplan-Meier knows nothing, a
log-normal fitted to the estimate carries the table a little further (_extend_tail). The answer
is a table S[k] = P(R > k / resolution), k = 0..resolution, which the demand forecast indexes
(gateway/demand_forecast.py); it is refreshed when a sixteenth of the window is new, so its cost
(a sort of a few thousand numbers, the fit's ~2,000 quantiles) is paid rarely.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from statistics import NormalDist

import numpy as np

DEFAULT_WINDOW = 2000
MIN_SAMPLES = 8  # finished sequences before the model answers; until then, all of max_tokens is assumed
MIN_FIT_POINTS = 8  # distinct lengths seen to end that the tail's log-normal fit needs
DEFAULT_RESOLUTION = 1024  # table points: exact per token for max_tokens up to this
TAIL_REACH = 2.0  # the fitted tail extends the table up to this multiple of the longest share seen to end


def used_shares(generated: Iterable[int], max_output: Iterable[int]) -> np.ndarray:
    """Each running sequence's used share of its max output tokens so far (those with a positive
    limit): the censored observations the model is refreshed with."""
    return np.array([g / m for g, m in zip(generated, max_output, strict=True) if m > 0], dtype=np.float64)


def kaplan_meier_steps(events: np.ndarray, censored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct observed values of R (`events`) and P(R > each), given lower bounds too
    (`censored`: R > c). A censored value c is at risk at every x <= c."""
    times, deaths = np.unique(events, return_counts=True)
    events_sorted = np.sort(events)
    censored_sorted = np.sort(censored)
    at_risk = (len(events_sorted) - np.searchsorted(events_sorted, times, side="left")) + (
        len(censored_sorted) - np.searchsorted(censored_sorted, times, side="left")
    )
    return times, np.cumprod(1.0 - deaths / at_risk)


def kaplan_meier(events: np.ndarray, censored: np.ndarray, points: np.ndarray) -> np.ndarray:
    """P(R > x) at each of `points` (see kaplan_meier_steps)."""
    return step_values(*kaplan_meier_steps(events, censored), points)


def step_values(times: np.ndarray, survival: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The step function that is survival[i] from times[i] on (1 before the first) at `points`."""
    return np.concatenate(([1.0], survival))[np.searchsorted(times, points, side="right")]


def fit_log_normal(times: np.ndarray, survival: np.ndarray) -> tuple[float, float] | None:
    """(mu, sigma) of the log-normal distribution whose quantiles best match the Kaplan-Meier
    estimate at its observed values (a least-squares line through its log-normal probability plot:
    ln x = mu + sigma * z, z the normal quantile of P(R <= x)), or None where too few of them
    (MIN_FIT_POINTS) lie strictly inside (0, 1) or the line does not rise."""
    below = 1.0 - survival
    inside = (below > 1e-6) & (below < 1.0 - 1e-6) & (times > 0.0)
    if np.count_nonzero(inside) < MIN_FIT_POINTS:
        return None
    normal = NormalDist()
    quantiles = np.fromiter((normal.inv_cdf(p) for p in below[inside]), float)
    sigma, mu = np.polyfit(quantiles, np.log(times[inside]), 1)
    return (float(mu), float(sigma)) if sigma > 0.0 else None


def log_normal_survival(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    """P(X > x) for X log-normal(mu, sigma), at x > 0."""
    scale = 1.0 / (sigma * math.sqrt(2.0))
    return np.fromiter((0.5 * math.erfc((math.log(v) - mu) * scale) for v in x), float, len(x))


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
            events = np.fromiter(self._finished, float, len(self._finished))
            times, steps = kaplan_meier_steps(events, censored)
            table = step_values(times, steps, self._points)
            self._extend_tail(table, times, steps)
            table[-1] = 0.0  # P(R > 1): none, though sequences censored at their limit leave KM above 0 there
            self._table = table
            self._new_since_refresh = 0
        return self._table

    def _extend_tail(self, table: np.ndarray, times: np.ndarray, steps: np.ndarray) -> None:
        """Past the longest share seen to end, Kaplan-Meier stays flat: whoever runs that long is
        assumed to run to its limit. After a start, before sequences have run long, that is most of
        them, and admission stays as cautious as with nothing learned for hundreds of steps (the
        simulator's first 500). So the table goes on, up to TAIL_REACH times that share, along a
        log-normal fitted to the estimate so far (output lengths are close to log-normal, as in
        ShareGPT), conditioned on the survival reached there; it stays flat after that. The reach is
        bounded because a sequence running far past every length seen is evidence of longer traffic
        than the fit knows (a shift from short answers to long ones), which must not be assumed to
        end soon. Traffic that runs to its limit has ended at 1 and is left as it is."""
        last = times[-1]
        fit = fit_log_normal(times, steps) if last < 1.0 else None
        if fit is None:
            return
        beyond = self._points > last
        reach = np.minimum(self._points[beyond], min(1.0, TAIL_REACH * last))
        fitted = log_normal_survival(np.append(last, reach), *fit)
        if fitted[0] > 0.0:
            table[beyond] = steps[-1] * fitted[1:] / fitted[0]

    def mean_share(self, running_shares: np.ndarray | None = None) -> float | None:
        """The expected used share E[R] (for the admin views), or None while too few sequences have
        finished. The table is refreshed first when it is due, as in survival(): without that the
        figure would wait for the next admission decision, and an idle pool would show a stale one."""
        table = self.survival(running_shares)
        return None if table is None else float(table[:-1].mean())
