"""Admission decisions, the one place that says whether a request may enter a scheduler and
whether a waiting one may join the running batch now.

Refusals are kinds, not HTTP statuses: the scheduling core knows nothing of HTTP, and the API
layer maps each kind to its status (gateway/api/errors.py: too_large and invalid 400,
queue_full 429, unavailable 503).
"""

from __future__ import annotations

import enum
from collections import Counter

from paged.gateway.block_allocator import BlockAllocator, CacheHit
from paged.gateway.demand_forecast import DemandCurve, DemandForecast, DemandRows, request_rows, running_rows, swapped_rows
from paged.gateway.request import Request, Sequence
from paged.shared.config import SchedulerConfig


class Refusal(enum.Enum):
    TOO_LARGE = "too_large"  # can never run here: beyond the context window, the pool or max_num_seqs
    INVALID = "invalid"  # malformed for the engine, e.g. a request id that is already running
    QUEUE_FULL = "queue_full"  # an admission cap: retry later
    UNAVAILABLE = "unavailable"  # no worker is ready, or the server is draining


class AdmissionError(Exception):
    """A request the engine refuses up front, with the kind of refusal."""

    def __init__(self, kind: Refusal, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


def check_arrival(
    request: Request,
    config: SchedulerConfig,
    allocator: BlockAllocator,
    max_model_len: int,
    num_waiting: int,
    waiting_tokens: int,
) -> int:
    """Refuse (AdmissionError) a request that can never fit, or that would overflow the waiting
    queue's caps; else return the most tokens each of its sequences may reach."""
    prompt_len = request.num_prompt_tokens
    if prompt_len >= max_model_len:
        raise AdmissionError(
            Refusal.TOO_LARGE,
            f"prompt has {prompt_len} tokens but the context window is {max_model_len} tokens, "
            "which leaves no room for output",
        )
    n = request.params.n
    if n > config.max_num_seqs:
        raise AdmissionError(Refusal.TOO_LARGE, f"n={n} sequences can never run at once: max_num_seqs is {config.max_num_seqs}")
    max_num_tokens = min(prompt_len + request.params.max_tokens, max_model_len)
    # Admitted work always finishes because its peak, running alone, fits the pool (scheduler.py).
    peak = allocator.peak_blocks(prompt_len, max_num_tokens, n)
    if peak > allocator.num_blocks:
        raise AdmissionError(
            Refusal.TOO_LARGE,
            f"request needs up to {peak} KV blocks of {allocator.block_size} tokens "
            f"(prompt {prompt_len} tokens, up to {max_num_tokens} tokens per sequence, n={n}) "
            f"but the KV cache has {allocator.num_blocks} blocks",
        )
    if num_waiting >= config.max_waiting_requests:
        raise AdmissionError(
            Refusal.QUEUE_FULL, f"waiting queue full: {num_waiting} requests waiting, limit {config.max_waiting_requests}"
        )
    if waiting_tokens + prompt_len > config.max_waiting_tokens:
        raise AdmissionError(
            Refusal.QUEUE_FULL,
            f"waiting queue full: {waiting_tokens} prompt tokens waiting plus {prompt_len} "
            f"exceeds the limit of {config.max_waiting_tokens}",
        )
    return max_num_tokens


def seats_needed(request: Request, seqs: list[Sequence]) -> int:
    """Running-batch seats a waiting or swapped request takes: all n of a request not forked yet
    (its children appear after its prompt's last chunk)."""
    return len(seqs) if request.forked else request.params.n


def may_take_seats(request: Request, seqs: list[Sequence], seats_taken: int, config: SchedulerConfig) -> bool:
    """Whether a request joins the running batch without exceeding max_num_seqs."""
    return seats_taken + seats_needed(request, seqs) <= config.max_num_seqs


def reserve_blocks(watermark_blocks: int, num_running: int) -> int:
    """Blocks an admission or swap-in must leave free: the watermark while others run (room for
    their next decodes), none for the first request (it must always be able to start)."""
    return watermark_blocks if num_running else 0


# Predictive admission ---------------------------------------------------------------------------

THRASH_TIGHTENING = 0.1  # while the pool thrashes, the admission cap is this share of the pool lower


class AdmissionMargin:
    """How many standard deviations of the forecast's uncertainty admission leaves free. A
    preemption for memory means the forecast was too optimistic: the margin grows by `step`; every
    step without one it decays back towards `floor` (by `decay` of the excess per step), so a burst
    of long outputs tightens admission for a while and a calm pool packs tightly again."""

    def __init__(self, floor: float = 1.0, step: float = 0.25, decay: float = 0.998, ceiling: float = 6.0) -> None:
        self.floor = floor
        self.step = step
        self.decay = decay
        self.ceiling = ceiling
        self.z = floor

    def preempted(self) -> None:
        self.z = min(self.z + self.step, self.ceiling)

    def calm_step(self) -> None:
        self.z = self.floor + (self.z - self.floor) * self.decay


class PredictiveAdmission:
    """Admit a request only if the blocks held now, plus the running sequences' expected growth
    (minus what they are expected to free) and the request's own, plus the margin, stay under the
    admission cap at every coming step (gateway/demand_forecast.py).

    The running set's curve is built once per step, at the first admission it is asked about (so
    only when something waits), and each admitted request's curve is added to it: the requests
    admitted in one step see each other. The first request always fits when nothing runs: its
    peak alone fits the pool (add_request checks it), which keeps every admitted request finishing.
    """

    def __init__(self, allocator: BlockAllocator, forecast: DemandForecast, margin: AdmissionMargin) -> None:
        self.allocator = allocator
        self.forecast = forecast
        self.margin = margin
        self.tightened = False  # the pool thrashes (set by the scheduler each step)
        self._rows: DemandRows | None = None  # running set plus requests admitted this step
        self._curve: DemandCurve | None = None
        self._used = 0  # blocks held when the running curve was built
        # References the requests admitted since then took on prefix-hit blocks, by block: their
        # rows count those blocks as their own (demand_forecast.request_rows).
        self._taken: Counter[int] = Counter()
        self._candidate: tuple[DemandRows, DemandCurve, list[CacheHit]] | None = None

    def begin_step(self) -> None:
        self._rows = self._curve = self._candidate = None
        self._taken.clear()

    def cap(self, config: SchedulerConfig) -> float:
        return max(config.kv_admission_cap - (THRASH_TIGHTENING if self.tightened else 0.0), 0.0)

    def fits(
        self,
        request: Request,
        seqs: list[Sequence],
        hits: list[CacheHit],
        awaiting: list[Sequence],
        running: list[Sequence],
        awaiting_requests: list[Request],
        config: SchedulerConfig,
    ) -> bool:
        """Whether the waiting request may be admitted now; call admitted() if it then is."""
        candidate = request_rows(request, seqs, hits, awaiting, self.allocator, self._taken)
        return self._fits(candidate, hits, running, awaiting_requests, config)

    def fits_swapped(
        self, request: Request, seqs: list[Sequence], running: list[Sequence], awaiting_requests: list[Request], config: SchedulerConfig
    ) -> bool:
        """Whether the swapped request may come back now (its growth counts as a new request's: swap-in
        that only checked the blocks it takes now over-committed the pool again); call admitted() if
        it then does."""
        return self._fits(swapped_rows(request, seqs, self.allocator), [], running, awaiting_requests, config)

    def _fits(
        self,
        candidate: DemandRows,
        hits: list[CacheHit],
        running: list[Sequence],
        awaiting_requests: list[Request],
        config: SchedulerConfig,
    ) -> bool:
        if not running and not awaiting_requests:
            self._candidate = None
            return True
        allocator = self.allocator
        rows, curve = self._rows, self._curve
        if rows is None:
            rows = self._rows = running_rows(running, awaiting_requests, allocator)
            self._used = allocator.num_blocks - allocator.num_free_blocks
        if curve is None or candidate.horizon() > curve.grid[-1]:
            grid = self.forecast.grid(max(rows.horizon(), candidate.horizon()))
            curve = self._curve = self.forecast.curve(rows, grid)
        total = curve + self.forecast.curve(candidate, curve.grid)
        if self._used + total.peak(self.margin.z) > self.cap(config) * allocator.num_blocks:
            self._candidate = None
            return False
        self._candidate = (candidate, total, hits)
        return True

    def admitted(self) -> None:
        """The request fits() or fits_swapped() accepted last joined: its curve joins the running set's."""
        if self._candidate is not None and self._rows is not None:
            rows, self._curve, hits = self._candidate
            self._rows.extend(rows)
            for hit in hits:
                self._taken.update(hit.blocks)
        self._candidate = None
