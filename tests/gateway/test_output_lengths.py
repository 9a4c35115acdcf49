"""The output-length model: Kaplan-Meier over finished sequences (events) and running ones
(censored), as a survival table of the used share of max_tokens."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from paged.gateway.output_lengths import OutputLengthModel, kaplan_meier


def test_without_censoring_kaplan_meier_is_the_empirical_survival() -> None:
    events = np.array([0.1, 0.2, 0.2, 0.5, 1.0])
    points = np.array([0.0, 0.1, 0.15, 0.2, 0.49, 0.5, 0.99, 1.0])
    assert np.allclose(kaplan_meier(events, np.empty(0), points), [1.0, 0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.0])


def test_a_censored_value_counts_at_risk_up_to_where_it_was_seen() -> None:
    # Events 0.1 and 0.3; one sequence still running at 0.2. At 0.1: 3 at risk, one ends (2/3
    # survive); at 0.3 only the event is at risk (the censored one is known to exceed 0.2 only).
    survival = kaplan_meier(np.array([0.1, 0.3]), np.array([0.2]), np.array([0.05, 0.1, 0.25, 0.3]))
    assert np.allclose(survival, [1.0, 2 / 3, 2 / 3, 0.0])


@pytest.mark.parametrize("seed", range(4))
def test_censoring_by_the_running_set_removes_the_bias_of_early_finishers(seed: int) -> None:
    """Sequences started at random times, observed at one instant: the finished ones are biased
    short. With the running ones censored the median comes out near the true one (120 tokens)."""
    rng = random.Random(seed)
    max_tokens = 1000
    finished, running = [], []
    for _ in range(600):
        length = min(max_tokens, max(1, round(rng.lognormvariate(math.log(120), 1.0))))
        age = rng.randrange(0, 600)  # steps since it started
        if length <= age:
            finished.append(length)
        else:
            running.append(age)
    points = np.arange(max_tokens + 1) / max_tokens

    def median(survival: np.ndarray) -> int:
        return int(np.argmax(survival <= 0.5))

    naive = median(kaplan_meier(np.array(finished) / max_tokens, np.empty(0), points))
    corrected = median(kaplan_meier(np.array(finished) / max_tokens, np.array(running) / max_tokens, points))
    assert naive < 95  # the short ones finished first
    assert 105 <= corrected <= 135


def test_the_model_answers_nothing_until_enough_sequences_finished() -> None:
    model = OutputLengthModel(min_samples=4, resolution=10)
    for used in (1, 2, 3):
        model.observe(used, 10)
    assert model.survival() is None and model.mean_share() is None
    model.observe(10, 10)  # ran to its limit: share 1
    table = model.survival()
    assert table is not None
    assert np.allclose(table, [1.0, 0.75, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.0])
    assert model.mean_share() == float(table[:-1].mean())


def test_the_table_is_refreshed_when_a_sixteenth_of_the_window_is_new() -> None:
    model = OutputLengthModel(window=64, min_samples=1, resolution=8)
    for _ in range(64):
        model.observe(8, 8)
    first = model.survival()
    assert first is not None and first[-2] == 1.0
    for _ in range(3):
        model.observe(1, 8)
    assert not model.needs_refresh() and model.survival() is first
    model.observe(1, 8)
    assert model.needs_refresh()
    assert model.survival()[1] < 1.0  # type: ignore[index]


def test_no_sequence_outlives_its_max_tokens() -> None:
    # Sequences running at their limit are censored at R = 1, which leaves Kaplan-Meier's survival
    # above 0 there; but R <= 1, so P(R > 1) is 0 and the forecast lets every sequence end by its limit.
    model = OutputLengthModel(min_samples=1, resolution=10)
    for share in (1, 1, 1, 5):
        model.observe(share, 10)
    table = model.survival(np.array([1.0, 1.0, 1.0]))
    assert table is not None and table[-1] == 0.0 and table[-2] > 0.0
