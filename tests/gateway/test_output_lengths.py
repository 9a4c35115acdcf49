"""The output-length model: Kaplan-Meier over finished sequences (events) and running ones
(censored), as a survival table of the used share of max_tokens."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from paged.gateway.output_lengths import (
    TAIL_REACH,
    OutputLengthModel,
    fit_log_normal,
    kaplan_meier,
    kaplan_meier_steps,
    log_normal_survival,
)


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


def test_the_log_normal_fit_recovers_the_parameters_from_kaplan_meier() -> None:
    rng = np.random.default_rng(0)
    events = rng.lognormal(math.log(0.12), 0.8, 4000)
    fit = fit_log_normal(*kaplan_meier_steps(events[events < 1.0], np.empty(0)))
    assert fit is not None
    mu, sigma = fit
    assert abs(mu - math.log(0.12)) < 0.05 and abs(sigma - 0.8) < 0.05


@pytest.mark.parametrize("seed", range(4))
def test_after_a_start_the_tail_follows_a_fitted_log_normal_up_to_its_reach(seed: int) -> None:
    """200 sequences started together, seen at step 100: the finished ones end before 100 tokens
    and the running ones are censored there. Kaplan-Meier alone stays flat past the longest one
    seen to end (all of those still running would run to max_tokens); the fitted tail follows the
    true survival up to TAIL_REACH times that share, and is flat after it."""
    rng = random.Random(seed)
    max_tokens, now = 1024, 100
    lengths = [min(max_tokens, max(10, round(rng.lognormvariate(math.log(120), 1.0)))) for _ in range(200)]
    model = OutputLengthModel(resolution=max_tokens)
    for length in lengths:
        if length <= now:
            model.observe(length, max_tokens)
    running = np.array([now / max_tokens for length in lengths if length > now])
    table = model.survival(running)
    assert table is not None
    last = max(length for length in lengths if length <= now)
    reach = round(TAIL_REACH * last)
    flat = kaplan_meier(np.array([length / max_tokens for length in lengths if length <= now]), running,
                        np.array([reach / max_tokens]))[0]
    truth = float(log_normal_survival(np.array([float(reach)]), math.log(120), 1.0)[0])
    assert flat > truth + 0.15  # without the fit: a quarter or more of all sequences assumed to run to the limit
    assert abs(table[reach] - truth) < 0.08
    assert np.all(table[reach:-1] == table[reach])  # past the reach: flat, as Kaplan-Meier alone
    assert np.all(np.diff(table) <= 0.0)


def test_traffic_that_ends_at_its_limit_keeps_the_plain_estimate() -> None:
    model = OutputLengthModel(min_samples=1, resolution=100)
    used = list(range(5, 25)) + [100] * 5
    for tokens in used:
        model.observe(tokens, 100)
    shares = [tokens / 100 for tokens in used]
    table = model.survival()
    assert table is not None
    assert np.allclose(table[:-1], kaplan_meier(np.array(shares), np.empty(0), np.arange(100) / 100))
