"""The thrash detector on a fake clock: window figures from the running totals, one episode per
crossing (hysteresis), the refetch criterion, and a window that slides on while idle."""

from __future__ import annotations

from paged.gateway.thrash_detector import RESOLUTION_S, ThrashDetector, WorkTotals, window_figures
from paged.shared.config import SchedulerConfig

CONFIG = SchedulerConfig(thrash_window=10.0, thrash_recompute_share=0.1, thrash_refetch_share=0.5)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_window_figures_are_differences_over_the_span() -> None:
    old = WorkTotals(computed_tokens=1000, recomputed_tokens=10, preemptions=2, evictions=5, refetched_blocks=1,
                     prefix_queries_tokens=100, prefix_hits_tokens=20)  # fmt: skip
    new = WorkTotals(computed_tokens=3000, recomputed_tokens=510, preemptions=6, evictions=25, refetched_blocks=6,
                     prefix_queries_tokens=300, prefix_hits_tokens=170)  # fmt: skip
    figures = window_figures(old, new, 4.0)
    assert figures.recompute_share == 0.25 and figures.goodput == 0.75
    assert figures.preemptions_per_s == 1.0 and figures.evictions_per_s == 5.0 and figures.refetch_share == 0.25
    assert figures.prefix_hit_rate == 0.75 and figures.computed_tokens == 2000 and figures.recomputed_tokens == 500


def run(detector: ThrashDetector, clock: Clock, totals: list[WorkTotals]) -> list[bool | None]:
    """One sample per second of the given totals; the detector's answers."""
    changes = []
    for sample in totals:
        clock.now += 1.0
        assert detector.sample_due()
        changes.append(detector.observe(sample, CONFIG))
    return changes


def test_one_episode_per_crossing_and_it_clears_below_half_the_threshold() -> None:
    clock = Clock()
    detector = ThrashDetector(clock=clock)
    computed = recomputed = 0
    totals = []
    # 5 s healthy, 10 s with 30% recomputed, then healthy again.
    for second in range(40):
        computed += 1000
        recomputed += 300 if 5 <= second < 15 else 0
        totals.append(WorkTotals(computed_tokens=computed, recomputed_tokens=recomputed))
    changes = run(detector, clock, totals)
    assert changes.count(True) == 1 and changes.count(False) == 1
    started, cleared = changes.index(True), changes.index(False)
    assert 5 <= started < 8
    # The window still holds thrashing seconds after it stops; it clears once the share is < 5%.
    assert 15 < cleared <= 26
    assert not detector.thrashing and detector.figures.recompute_share == 0.0


def test_evicting_content_that_is_needed_again_thrashes_however_fast_the_pool_runs() -> None:
    clock = Clock()
    detector = ThrashDetector(clock=clock)
    # A fast pool evicting 1000 blocks a second of content nobody asks for again: healthy.
    run(detector, clock, [WorkTotals(computed_tokens=16000 * k, evictions=1000 * k) for k in range(1, 6)])
    assert not detector.thrashing and detector.figures.evictions_per_s == 1000.0
    # A slow one refetching 6 of every 10 blocks it evicts: thrashing.
    detector = ThrashDetector(clock=clock)
    totals = [WorkTotals(computed_tokens=100 * k, evictions=10 * k, refetched_blocks=6 * k) for k in range(1, 6)]
    assert run(detector, clock, totals).count(True) == 1  # the episode starts once and goes on
    assert detector.thrashing and detector.figures.refetch_share == 0.6
    # Too few evictions to judge: 3 of 4 refetched in the whole window.
    detector = ThrashDetector(clock=clock)
    run(detector, clock, [WorkTotals(evictions=k, refetched_blocks=k - 1 if k else 0) for k in range(5)])
    assert not detector.thrashing


def test_samples_are_taken_at_most_every_resolution() -> None:
    clock = Clock()
    detector = ThrashDetector(clock=clock)
    assert detector.sample_due()
    detector.observe(WorkTotals(), CONFIG)
    clock.now += RESOLUTION_S / 2
    assert not detector.sample_due()
    clock.now += RESOLUTION_S / 2
    assert detector.sample_due()


def test_an_idle_window_slides_on_and_clears() -> None:
    clock = Clock()
    detector = ThrashDetector(clock=clock)
    run(detector, clock, [WorkTotals(computed_tokens=100 * k, recomputed_tokens=50 * k) for k in range(1, 5)])
    assert detector.thrashing
    idle = WorkTotals(computed_tokens=400, recomputed_tokens=200)
    changes = run(detector, clock, [idle] * 15)
    assert changes.count(False) == 1 and not detector.thrashing


def test_less_than_a_quarter_of_the_window_is_not_judged() -> None:
    clock = Clock()
    detector = ThrashDetector(clock=clock)
    # One preemption's recompute right after a start: 2 s of data in a 10 s window.
    assert run(detector, clock, [WorkTotals(computed_tokens=100 * k, recomputed_tokens=90 * k) for k in range(1, 4)]) == [None] * 3
    assert detector.figures.recompute_share == 0.9 and not detector.thrashing
    assert run(detector, clock, [WorkTotals(computed_tokens=400, recomputed_tokens=360)]) == [True]
