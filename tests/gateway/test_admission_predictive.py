"""Predictive admission, driven through the scheduler against the verifying simulated worker: it
waits where greedy admission over-commits and preempts, learns how much of max_tokens requests
use, backfills past a head that does not fit without starving it, and keeps the pool from
thrashing where greedy admission at a cap of 1.0 makes it thrash (paged_kv_thrashing, the log)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from paged.gateway import step_planner
from paged.gateway.admission import AdmissionMargin
from paged.gateway.api.metrics import Metrics
from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.preemption import cheaper_mode
from paged.gateway.scheduler import Scheduler
from paged.gateway.stats import WorkerStats, extend
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.protocol import StepInput
from support.scheduler_steps import BS, EOS, ORDERS, loop_for, make, req, run, texts


def predictive(num_blocks: int, **config: object) -> Scheduler:
    return make(num_blocks, admission_policy="predictive", **config)


@ORDERS
def test_predictive_admission_waits_where_greedy_preempts(overlapped: bool) -> None:
    # 6 blocks: two 9-token prompts growing to 20 tokens (5 blocks each) cannot both finish resident.
    preemptions = {}
    for policy in ("greedy", "predictive"):
        scheduler = make(num_blocks=6, admission_policy=policy)
        scheduler.add_request(req("early", list(range(1, 10)), max_tokens=11, ignore_eos=True))
        scheduler.add_request(req("late", list(range(20, 29)), max_tokens=11, ignore_eos=True))
        loop = loop_for(scheduler, overlapped)
        run(loop)
        out = texts(loop.outputs)
        assert len(out["early"][0]) == 11 and len(out["late"][0]) == 11
        preemptions[policy] = scheduler.stats().preemptions
        assert scheduler.stats().recomputed_tokens == 0 or policy == "greedy"
    assert preemptions == {"greedy": preemptions["greedy"], "predictive": 0} and preemptions["greedy"] >= 1


def test_learned_output_lengths_admit_more_than_max_tokens_would() -> None:
    # Every sequence asks for 60 tokens and ends after 4. Reserving max_tokens, a 40-block pool holds
    # two 4-token prompts (16 blocks each); learning what they use, it holds many more.
    scheduler = predictive(40, max_num_seqs=64)
    for index in range(120):
        scheduler.add_request(req(f"r{index}", [1 + index % 40, 2, 3, 4], max_tokens=60))
    loop = loop_for(scheduler, overlapped=True, choose_token=lambda seq_id, position: EOS if position >= 7 else 5)
    peak_late = 0

    def check(step: StepInput) -> None:
        nonlocal peak_late
        assert_block_accounting(scheduler)
        if scheduler.figures.lengths.num_samples >= 40:
            peak_late = max(peak_late, scheduler.num_running)

    loop.run(5000, after_step=check)
    stats = scheduler.stats()
    assert stats.preemptions == 0 and stats.used_blocks == 0
    assert stats.expected_output_share < 0.1  # 4 of 60
    assert peak_late >= 6


@ORDERS
def test_recomputed_tokens_are_exactly_the_work_done_again(overlapped: bool) -> None:
    scheduler = make(num_blocks=6, prefix_caching=False)
    scheduler.add_request(req("early", list(range(1, 10)), max_tokens=11, ignore_eos=True))
    scheduler.add_request(req("late", list(range(20, 29)), max_tokens=11, ignore_eos=True))
    loop = loop_for(scheduler, overlapped)
    run(loop)
    stats = scheduler.stats()
    assert stats.preemptions >= 1
    # Without a prefix cache every token a preempted sequence had computed is computed again; the
    # computed-token counter is what the worker computed.
    assert stats.computed_tokens == loop.worker.num_tokens_computed
    first_time = 2 * (9 + 11 - 1)  # each sequence's prompt and outputs once (the last token needs no KV)
    assert stats.recomputed_tokens == stats.computed_tokens - first_time > 0


def test_prefix_cache_hits_after_a_preemption_are_not_recomputed() -> None:
    scheduler = make(num_blocks=6)
    scheduler.add_request(req("early", list(range(1, 10)), max_tokens=11, ignore_eos=True))
    scheduler.add_request(req("late", list(range(20, 29)), max_tokens=11, ignore_eos=True))
    loop = loop_for(scheduler, overlapped=False)
    run(loop)
    stats = scheduler.stats()
    assert stats.computed_tokens == loop.worker.num_tokens_computed
    assert stats.recomputed_tokens == stats.computed_tokens - 2 * (9 + 11 - 1)


def test_backfill_admits_a_smaller_request_past_a_head_that_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_planner, "MAX_BYPASSES", 1)
    scheduler = predictive(12)
    scheduler.add_request(req("running", list(range(1, 9)), max_tokens=16, ignore_eos=True))  # 6 blocks at its peak
    scheduler.add_request(req("large", list(range(20, 40)), max_tokens=8, ignore_eos=True))  # 7 blocks
    scheduler.add_request(req("small1", [41, 42, 43], max_tokens=5, ignore_eos=True))  # 2 blocks
    scheduler.add_request(req("small2", [44, 45, 46], max_tokens=5, ignore_eos=True))
    loop = loop_for(scheduler, overlapped=False)
    order: list[str] = []

    def check(step: StepInput) -> None:
        assert_block_accounting(scheduler)
        for request_id, request in scheduler.requests.items():
            if request.first_scheduled_time is not None and request_id not in order:
                order.append(request_id)

    loop.run(1000, after_step=check)
    # small1 runs past the large head; small2 would be a second bypass and waits for it.
    assert order == ["running", "small1", "large", "small2"]
    assert scheduler.stats().preemptions == 0
    assert all(len(tokens[0]) in (16, 8, 5) for tokens in texts(loop.outputs).values())


def test_the_margin_grows_with_preemptions_for_memory_and_decays_without() -> None:
    margin = AdmissionMargin(floor=1.0, step=0.5, decay=0.5, ceiling=2.0)
    margin.preempted()
    margin.preempted()
    margin.preempted()
    assert margin.z == 2.0
    margin.calm_step()
    assert margin.z == 1.5
    scheduler = make(num_blocks=6)  # greedy: over-commits, so sequences run out of blocks
    scheduler.add_request(req("early", list(range(1, 10)), max_tokens=11, ignore_eos=True))
    scheduler.add_request(req("late", list(range(20, 29)), max_tokens=11, ignore_eos=True))
    floor = scheduler.figures.margin.floor
    loop = loop_for(scheduler, overlapped=False)
    highest = floor

    def check(step: StepInput) -> None:
        nonlocal highest
        highest = max(highest, scheduler.figures.margin.z)

    loop.run(1000, after_step=check)
    assert highest > floor and scheduler.figures.margin.z < highest


def test_auto_preemption_swaps_private_blocks_and_recomputes_shared_ones() -> None:
    assert cheaper_mode(tokens_lost=64, blocks_to_copy=4, block_size=16) == "swap"
    assert cheaper_mode(tokens_lost=16, blocks_to_copy=4, block_size=16) == "recompute"
    scheduler = make(num_blocks=6, host_blocks=8, preemption_mode="auto")
    scheduler.add_request(req("early", list(range(1, 10)), max_tokens=11, ignore_eos=True))
    scheduler.add_request(req("late", list(range(20, 29)), max_tokens=11, ignore_eos=True))
    run(loop_for(scheduler, overlapped=False))
    stats = scheduler.stats()
    assert stats.preemptions >= 1 and stats.swaps_out > 0 and stats.recomputed_tokens == 0


# The over-committed pool of the issue: greedy admission at a cap of 1.0 thrashes, predictive does not.


def thrash_run(policy: str) -> tuple[float, int, list[dict]]:
    """A small pool under long outputs it cannot hold all at once; a step is 10 ms of virtual time."""
    steps = 0
    scheduler = Scheduler(
        SchedulerConfig(admission_policy=policy, kv_admission_cap=1.0, kv_watermark=0.0, thrash_window=2.0),
        CacheConfig(block_size=BS),
        24,
        max_model_len=64,
        clock=lambda: steps * 0.01,
    )
    for index in range(24):
        prompt = [1 + (index * 5 + k) % 40 for k in range(6 + index % 5)]
        scheduler.add_request(req(f"r{index}", prompt, max_tokens=24 + index % 9, ignore_eos=True))
    metrics = Metrics(_OneWorker(scheduler))  # type: ignore[arg-type]
    loop = StepLoop(scheduler, SimulatedWorker(24, BS), overlapped=True)
    highest = 0.0

    def check(step: StepInput) -> None:
        nonlocal steps, highest
        steps += 1
        assert_block_accounting(scheduler)
        gauge = metrics.registry.get_sample_value("paged_kv_thrashing", {"worker": "0"})
        highest = max(highest, gauge or 0.0)

    with capture_logs() as logs:
        loop.run(20_000, after_step=check)
    assert scheduler.stats().used_blocks == 0 and not scheduler.requests
    return highest, scheduler.stats().preemptions, logs


class _OneWorker:
    """The engine as /metrics reads it: one worker's snapshot."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def worker_stats(self) -> list[WorkerStats]:
        return [extend(self.scheduler.stats(), WorkerStats, name="0", state="ready", endpoint="local")]


def test_an_over_committed_pool_thrashes_and_predictive_admission_keeps_it_from_thrashing() -> None:
    greedy, greedy_preemptions, greedy_logs = thrash_run("greedy")
    assert greedy == 1.0 and greedy_preemptions > 10
    started = [log for log in greedy_logs if log["event"] == "kv_thrashing"]
    cleared = [log for log in greedy_logs if log["event"] == "kv_thrashing_cleared"]
    assert started and len(started) - len(cleared) in (0, 1)  # one event per episode
    assert started[0]["recompute_share"] >= 0.1 and started[0]["worker"] == "0"
    assert {"recomputed_tokens", "computed_tokens", "preemptions_per_s", "evictions_per_s", "refetch_share", "prefix_hit_rate"} <= set(started[0])

    calm, calm_preemptions, calm_logs = thrash_run("predictive")
    assert calm == 0.0 and calm_preemptions == 0
    assert not [log for log in calm_logs if log["event"] == "kv_thrashing"]


@ORDERS
@pytest.mark.parametrize("reprobe", [True, False], ids=["reprobe", "frozen"])
def test_a_blocked_head_is_probed_again_as_the_forecast_moves(
    overlapped: bool, reprobe: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 blocks of 4 tokens: a and b (4-token prompts, 8 tokens out) peak at 3 blocks each, and so does
    # c. Admitted next to them at once, c's growth would overlap theirs (9 blocks); a few steps later it
    # no longer does, although no block has been freed meanwhile. Without probing it again (frozen),
    # c waits until a finishes.
    if not reprobe:
        monkeypatch.setattr(step_planner, "REPROBE_STEPS", 10**9)
    scheduler = predictive(8, kv_admission_cap=1.0)
    for request_id, first in (("a", 1), ("b", 30), ("c", 60)):
        scheduler.add_request(req(request_id, list(range(first, first + 4)), max_tokens=8, ignore_eos=True))
    loop = loop_for(scheduler, overlapped)
    admitted_at: dict[str, int] = {}
    finished_at: dict[str, int] = {}

    def check(step: StepInput) -> None:
        assert_block_accounting(scheduler)
        for request_id in ("a", "b", "c"):
            request = scheduler.requests.get(request_id)
            if request is not None and request.first_scheduled_time is not None:
                admitted_at.setdefault(request_id, step.step_id)
            elif request is None:
                finished_at.setdefault(request_id, step.step_id)

    loop.run(500, after_step=check)
    assert scheduler.stats().preemptions == 0
    assert all(len(tokens[0]) == 8 for tokens in texts(loop.outputs).values())
    first_end = min(finished_at["a"], finished_at["b"])
    assert (admitted_at["c"] < first_end) is reprobe


def test_sequences_ended_by_an_abort_teach_the_length_model_and_waiting_ones_do_not() -> None:
    # A stop string is matched on text in the API layer, which then aborts the request: how long the
    # sequence ran is as real a length as an EOS. A request aborted before it ran says nothing.
    scheduler = predictive(80, max_num_seqs=4)
    for index in range(6):
        scheduler.add_request(req(f"r{index}", [1 + index, 2, 3, 4], max_tokens=60))
    loop = loop_for(scheduler, overlapped=False, choose_token=lambda seq_id, position: 5)
    for _ in range(4):
        loop.step()
    running = [request_id for request_id, request in scheduler.requests.items() if request.first_scheduled_time is not None]
    waiting = [request_id for request_id in scheduler.requests if request_id not in running]
    assert len(running) == 4 and len(waiting) == 2
    for request_id in [*running, *waiting]:
        assert scheduler.abort_request(request_id)
    lengths = scheduler.figures.lengths
    assert lengths.num_samples == 4
    assert all(0 < share < 0.1 for share in lengths._finished)  # a few of 60 tokens each
    loop.run(100)
    assert_block_accounting(scheduler)
    assert scheduler.stats().used_blocks == 0


def test_the_learned_share_in_the_stats_is_current_when_nothing_waits() -> None:
    # The table is refreshed for admission decisions, which only run while a request waits; the
    # admin views' figure must not wait for one.
    scheduler = predictive(64)
    lengths = scheduler.figures.lengths
    for _ in range(40):
        lengths.observe(30, 60)
    assert abs(scheduler.stats().expected_output_share - 0.5) < 0.01
    for _ in range(40):
        lengths.observe(6, 60)
    assert abs(scheduler.stats().expected_output_share - 0.3) < 0.01



# (prompt tokens, max_tokens) of requests that all run to their limit: found by a random search in
# which holding swap-in to the forecast swapped 385 times over 400 small pools and traffic mixes,
# against 521 without, and never more.
SWAP_TRAFFIC = [(20, 37), (11, 27), (14, 21), (6, 40), (2, 34), (4, 26)]


@ORDERS
def test_a_swapped_request_comes_back_only_when_the_forecast_holds_it(overlapped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Taught that sequences use a tenth of max_tokens, the pool admits requests that then run to
    # their limit: past every length seen they are expected to run to it, the pool runs short and the
    # tail is swapped out. Brought back as soon as its blocks were free, a swapped request took blocks
    # the others' growth needed and the pool swapped again; held to the forecast, it waits for room.
    def swap_outs(forecast_swap_in: bool) -> int:
        scheduler = predictive(38, host_blocks=128, preemption_mode="swap", kv_admission_cap=1.0)
        for index in range(64):
            scheduler.figures.lengths.observe(1 + index % 4, 40)
        if not forecast_swap_in:
            monkeypatch.setattr(scheduler.predictive, "fits_swapped", lambda *args: True)
        for index, (prompt_len, max_tokens) in enumerate(SWAP_TRAFFIC):
            prompt = [100 * index + offset + 1 for offset in range(prompt_len)]
            scheduler.add_request(req(f"r{index}", prompt, max_tokens=max_tokens, ignore_eos=True))
        loop = loop_for(scheduler, overlapped)
        loop.run(3000, after_step=lambda step: assert_block_accounting(scheduler))
        out = texts(loop.outputs)
        assert [len(out[f"r{index}"][0]) for index in range(len(SWAP_TRAFFIC))] == [m for _, m in SWAP_TRAFFIC]
        stats = scheduler.stats()
        assert stats.swaps_out > 0 and stats.recomputed_tokens == 0
        return stats.preemptions

    assert swap_outs(forecast_swap_in=True) < swap_outs(forecast_swap_in=False)
