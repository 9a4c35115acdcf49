"""The demand forecast: the expected change of held blocks over the coming steps, checked by hand
for a known length, against a Monte Carlo run of the model it describes, and for what counts as
freed (shared blocks do not) and who will exist soon (forked children)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from paged.gateway.demand_forecast import RESULT_LAG_STEPS, DemandForecast, DemandRows, request_rows, running_rows
from paged.gateway.kv_cache_manager import KVCacheManager
from paged.gateway.output_lengths import OutputLengthModel
from paged.gateway.request import Request
from paged.shared.sampling_params import SamplingParams

BS = 4


def test_a_sequence_that_runs_to_its_limit_grows_then_frees_everything() -> None:
    # Prompt 6, 2 tokens generated (8 tokens in 2 blocks), at most 6: it samples its last token
    # 4 steps from now (KV for 11 tokens: the last is never computed), and its blocks are freed
    # RESULT_LAG_STEPS later.
    rows = DemandRows()
    rows.add(generated=2, max_output=6, tokens=8, table_blocks=2, freed=2)
    forecast = DemandForecast(OutputLengthModel(), BS)  # nothing learned: runs to its limit
    grid = np.arange(9)
    curve = forecast.curve(rows, grid)
    end = 4 + RESULT_LAG_STEPS
    expected = [(-(-min(8 + t, 11) // BS) - 2) if t < end else -2 for t in grid]
    assert curve.mean.tolist() == expected
    assert curve.var.tolist() == [0.0] * len(grid)
    assert curve.peak(3.0) == max(expected)


@pytest.mark.parametrize("learned", [False, True], ids=["nothing-learned", "learned"])
def test_a_sequence_whose_last_token_is_being_sampled_holds_its_blocks_until_the_result(learned: bool) -> None:
    # The step being planned samples its last token (generated = max_output): its blocks are freed
    # only when that step's result is applied, RESULT_LAG_STEPS steps on. Counting them as freed at
    # once let a request admitted in the same step find no block for its first decode.
    model = OutputLengthModel(min_samples=1)
    if learned:
        for _ in range(8):
            model.observe(6, 6)  # every sequence so far ran to its limit
    rows = DemandRows()
    rows.add(generated=6, max_output=6, tokens=12, table_blocks=3, freed=3)
    curve = DemandForecast(model, BS).curve(rows, np.arange(5))
    assert curve.mean.tolist() == [0.0 if t < RESULT_LAG_STEPS else -3.0 for t in range(5)]


def test_the_curve_is_the_mean_and_variance_of_simulated_runs() -> None:
    rng = random.Random(1)
    model = OutputLengthModel(min_samples=1, resolution=100)
    for _ in range(500):
        model.observe(min(100, max(1, round(rng.lognormvariate(3.0, 0.8)))), 100)
    rows = DemandRows()
    for generated, prompt in ((0, 10), (5, 3), (20, 40), (60, 7)):
        tokens = prompt + generated
        blocks = -(-tokens // BS)
        rows.add(generated, 100, tokens, blocks, blocks)
    forecast = DemandForecast(model, BS)
    grid = np.arange(0, 110, 3)
    curve = forecast.curve(rows, grid)

    shares = np.array(model._finished)  # the model's distribution, drawn from directly
    draws = 4000
    held = np.zeros((draws, len(grid)))
    for generated, tokens, blocks in zip(rows.generated, rows.tokens, rows.table_blocks, strict=True):
        lengths = shares[shares * 100 > generated] * 100  # conditional on having survived so far
        ends = rng.choices(list(lengths), k=draws)
        for d, length in enumerate(ends):
            later = generated + np.maximum(grid - RESULT_LAG_STEPS, 0)
            alive = later < length
            most = tokens - generated + 100 - 1
            held[d] += np.where(alive, blocks + np.maximum(-(-np.minimum(tokens + grid, most) // BS) - blocks, 0), 0)
    held -= sum(rows.freed)
    assert np.allclose(curve.mean, held.mean(axis=0), atol=0.15 * np.sqrt(held.var(axis=0).max()) + 0.05)
    assert np.allclose(np.sqrt(curve.var), held.std(axis=0), rtol=0.1, atol=0.1)


def _request(request_id: str, prompt: list[int], n: int = 1, max_tokens: int = 8) -> Request:
    request = Request(request_id, prompt, SamplingParams(n=n, max_tokens=max_tokens))
    for seq in request.seqs:
        seq.max_num_tokens = len(prompt) + max_tokens
    return request


def test_blocks_another_table_holds_are_not_counted_as_freed() -> None:
    kv = KVCacheManager(32, BS)
    first = _request("a", list(range(1, 13)))
    (seq,) = first.seqs
    assert kv.admit(seq, kv.probe(seq), 12, 0)
    kv.cache_computed(seq, 12)
    second = _request("b", list(range(1, 13)) + [50, 51, 52])
    (other,) = second.seqs
    hit = kv.probe(other)
    assert hit.num_tokens == 12
    # Before b runs, a alone holds the blocks b hits, and a's row counts them as freed when a ends:
    # b keeps them held then, so its hit costs them (none of its blocks is already in a table it keeps).
    (row,) = zip(*vars_of(request_rows(second, [other], [hit], [], kv, {})), strict=True)
    assert row == (0, 8, 15, 0, 0)
    assert kv.admit(other, hit, 3, 0)
    seq.num_tokens = other.num_tokens = 15
    rows = running_rows([seq, other], [], kv)
    assert rows.freed == [0, 1]  # the three shared blocks stay held when either ends
    # Once two tables hold them, a third request's hit on them costs nothing.
    third = _request("c", list(range(1, 13)) + [60])
    (late,) = third.seqs
    (row,) = zip(*vars_of(request_rows(third, [late], [kv.probe(late)], [], kv, {})), strict=True)
    assert row == (0, 8, 13, 3, 0)
    # Unless b was admitted after a's row was built (in the step being planned): a's row frees
    # them at a's end and b's counts them as its own, so no row keeps them for c.
    taken = dict.fromkeys(hit.blocks, 1)
    (row,) = zip(*vars_of(request_rows(third, [late], [kv.probe(late)], [], kv, taken)), strict=True)
    assert row == (0, 8, 13, 0, 0)


def test_children_of_an_unforked_request_count_before_the_fork() -> None:
    kv = KVCacheManager(32, BS)
    request = _request("n3", list(range(1, 11)), n=3)
    (seq,) = request.live_seqs()
    rows = request_rows(request, [seq], [kv.probe(seq)], [], kv, {})
    # The parent takes the prompt's 3 blocks; each child shares the 2 full ones and needs its own.
    assert rows.table_blocks == [0, 2, 2] and rows.generated == [0, 0, 0]
    curve = DemandForecast(OutputLengthModel(), BS).curve(rows, np.array([0, 1]))
    assert curve.mean.tolist() == [3.0 + 1 + 1, 3.0 + 1 + 1]


def vars_of(rows: DemandRows) -> list[list[float]]:
    return [rows.generated, rows.max_output, rows.tokens, rows.table_blocks, rows.freed]


@pytest.mark.parametrize("horizon", [1, 50, 5000])
def test_the_grid_covers_the_horizon_with_at_most_its_points(horizon: int) -> None:
    forecast = DemandForecast(OutputLengthModel(), BS, num_points=200)
    grid = forecast.grid(horizon)
    assert grid[0] == 0 and grid[-1] == horizon and len(grid) <= 200 and np.all(np.diff(grid) > 0)
