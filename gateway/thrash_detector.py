"""Thrash detection: a pool that is over-committed keeps running, but preemption and recompute
eat its throughput while tokens/s still looks fine. This watches the work the scheduler counts
over a sliding window of seconds and says when the pool thrashes.

Figures over the window (differences of the scheduler's running totals between the window's
oldest and newest samples):
- recompute share: tokens computed again after a preemption / tokens computed (the goodput is
  its complement: the share of computed tokens computed for the first time);
- preemptions and cached-block evictions per second;
- refetch share: evicted cached blocks whose content an admission needed again soon after (the
  pool's last num_blocks evictions) / evicted blocks;
- the prefix-cache hit rate (hit / queried prompt tokens).

The pool thrashes when, over at least a quarter of the window, the recompute share reaches
`thrash_recompute_share`, or the refetch share reaches `thrash_refetch_share` (over at least
MIN_EVICTIONS evictions); it clears when both are
below half their thresholds (so that one figure hovering at a threshold is one episode, not many).
The scheduler tightens admission while it thrashes and logs one `kv_thrashing` event per episode,
and one `kv_thrashing_cleared` when it ends.

Why evictions are judged by what was evicted and not by how many per second: a busy pool evicts
cached content with nearly every block it allocates once everything is cached, healthy or not, so a
rate says only how fast it runs (a 25-block pool serving stories260K at 2,000 tokens/s turns over
five times a second; a GPU pool of 100,000 blocks takes tens of seconds). Content evicted and then
needed again is the waste, whatever the pool's size and speed.

Samples are taken at most every `RESOLUTION_S` seconds, so the cost per step is a clock read.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from paged.shared.config import SchedulerConfig

RESOLUTION_S = 0.25
CLEAR_FRACTION = 0.5  # thrashing clears when every figure is below this share of its threshold
MIN_EVICTIONS = 8  # fewer evictions in the window say nothing about the refetch share
MIN_SPAN = 0.25  # nor does less than this share of the window (after a start): one preemption is no episode


@dataclass(frozen=True, slots=True)
class WorkTotals:
    """The scheduler's running totals, as one sample of them."""

    computed_tokens: int = 0
    recomputed_tokens: int = 0
    preemptions: int = 0
    evictions: int = 0
    refetched_blocks: int = 0
    prefix_queries_tokens: int = 0
    prefix_hits_tokens: int = 0


@dataclass(frozen=True, slots=True)
class WindowFigures:
    seconds: float = 0.0  # how much time the figures span (less than the window after a start)
    computed_tokens: int = 0
    recomputed_tokens: int = 0
    recompute_share: float = 0.0
    goodput: float = 1.0  # computed for the first time / computed (1 when nothing was computed)
    preemptions_per_s: float = 0.0
    evictions: int = 0
    evictions_per_s: float = 0.0
    refetch_share: float = 0.0
    prefix_hit_rate: float = 0.0


def window_figures(old: WorkTotals, new: WorkTotals, seconds: float) -> WindowFigures:
    computed = new.computed_tokens - old.computed_tokens
    recomputed = new.recomputed_tokens - old.recomputed_tokens
    share = recomputed / computed if computed else 0.0
    queries = new.prefix_queries_tokens - old.prefix_queries_tokens
    evictions = new.evictions - old.evictions
    per_s = 1.0 / seconds if seconds > 0 else 0.0
    return WindowFigures(
        seconds=seconds,
        computed_tokens=computed,
        recomputed_tokens=recomputed,
        recompute_share=share,
        goodput=1.0 - share,
        preemptions_per_s=(new.preemptions - old.preemptions) * per_s,
        evictions=evictions,
        evictions_per_s=evictions * per_s,
        refetch_share=(new.refetched_blocks - old.refetched_blocks) / evictions if evictions else 0.0,
        prefix_hit_rate=(new.prefix_hits_tokens - old.prefix_hits_tokens) / queries if queries else 0.0,
    )


class ThrashDetector:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.thrashing = False
        self.figures = WindowFigures()
        self._samples: deque[tuple[float, WorkTotals]] = deque()  # oldest first, RESOLUTION_S apart

    def sample_due(self) -> bool:
        samples = self._samples
        return not samples or self.clock() - samples[-1][0] >= RESOLUTION_S

    def observe(self, totals: WorkTotals, config: SchedulerConfig) -> bool | None:
        """Take a sample of the totals now (when sample_due()). Returns True when thrashing starts,
        False when it clears, None otherwise."""
        now = self.clock()
        samples = self._samples
        samples.append((now, totals))
        # Keep the newest sample at least a window old, so the figures span the whole window.
        while len(samples) > 2 and now - samples[1][0] >= config.thrash_window:
            samples.popleft()
        start, oldest = samples[0]
        self.figures = figures = window_figures(oldest, totals, now - start)
        if figures.seconds < config.thrash_window * MIN_SPAN:
            return None
        recompute = figures.recompute_share / config.thrash_recompute_share
        refetch = figures.refetch_share / config.thrash_refetch_share if figures.evictions >= MIN_EVICTIONS else 0.0
        if not self.thrashing and max(recompute, refetch) >= 1.0:
            self.thrashing = True
            return True
        if self.thrashing and max(recompute, refetch) < CLEAR_FRACTION:
            self.thrashing = False
            return False
        return None
