"""Scheduler tests of n > 1 requests (fork, copy-on-write, shared prompt after a recompute) and of
preemption (recompute, swap, priority), driven like test_scheduler.py and audited after every step."""

from __future__ import annotations

import contextlib
import random

import pytest

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.engine_client import AdmissionError
from paged.gateway.request import Request, SequenceStatus
from paged.gateway.scheduler import Scheduler
from paged.gateway.step_pipeline import LocalStepLoop
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.protocol import SeqResult, StepInput, StepOutput
from paged.shared.sampling_params import SamplingParams
from support.scheduler_steps import ORDERS, make, req, loop_for, run, texts


# n > 1: fork and copy-on-write -------------------------------------------------------------


@ORDERS
def test_parallel_sampling_forks_and_copies_on_write(overlapped: bool) -> None:
    scheduler = make()
    request = req("a", [1, 2, 3, 4, 5, 6], n=3, max_tokens=4, seed=10)
    scheduler.add_request(request)
    loop = loop_for(scheduler, overlapped, choose_token=lambda seq_id, position: 1 + (seq_id * 13 + position) % 40)
    first = loop.step()
    (scheduled,) = first.scheduled
    children = [seq.seq_id for seq in request.seqs[1:]]
    assert scheduled.fork_ids == children
    assert [seq.sampling.seed for seq in request.seqs] == [10, 11, 12]
    assert scheduler.stats().shared_blocks == 2
    second = loop.step()
    # Each of the 3 writes position 6 into the shared partial block 1: two copy, the last writes in place.
    assert len(second.copies) == 2
    copied = {s.seq_id: s for s in second.scheduled if s.table_from == 1}
    assert len(copied) == 2 and all(len(s.new_blocks) == 1 for s in copied.values())
    assert not second.new_seqs
    run(loop)
    out = texts(loop.outputs)["a"]
    assert sorted(out) == [0, 1, 2] and all(len(tokens) == 4 for tokens in out.values())
    assert len({tuple(tokens) for tokens in out.values()}) == 3
    assert loop.outputs[-1].finished


@ORDERS
def test_parallel_sampling_with_a_block_aligned_prompt_shares_without_copies(overlapped: bool) -> None:
    scheduler = make()
    scheduler.add_request(req("a", list(range(1, 9)), n=2, max_tokens=3))
    loop = loop_for(scheduler, overlapped)
    loop.step()
    assert loop.step().copies == []
    run(loop)


# Preemption ----------------------------------------------------------------------------------


@ORDERS
def test_recompute_preemption_evicts_the_latest_arrival_and_resumes_it(overlapped: bool) -> None:
    # 6 blocks: two requests of 9-token prompts growing to 20 tokens cannot both finish resident.
    scheduler = make(num_blocks=6)
    scheduler.add_request(req("early", list(range(1, 10)), max_tokens=11, ignore_eos=True))
    scheduler.add_request(req("late", list(range(20, 29)), max_tokens=11, ignore_eos=True))
    loop = loop_for(scheduler, overlapped)
    late = scheduler.requests["late"]
    late_seq = late.seqs[0].seq_id
    resumed = []

    def check(step: StepInput) -> None:
        assert_block_accounting(scheduler)
        resumed.extend(new for new in step.new_seqs if new.seq_id == late_seq)

    loop.run(500, after_step=check)
    assert scheduler.requests == {}
    assert late.num_preemptions >= 1
    assert scheduler.stats().preemptions >= 1
    # Resumed with its prompt plus what it had generated.
    assert len(resumed) >= 2
    assert resumed[-1].num_output_tokens > 0
    assert resumed[-1].token_ids[:9] == list(range(20, 29))
    out = texts(loop.outputs)
    assert len(out["early"][0]) == 11 and len(out["late"][0]) == 11
    assert late.seqs[0].output_token_ids == out["late"][0]


@ORDERS
def test_swap_preemption_keeps_worker_state_and_restores_blocks(overlapped: bool) -> None:
    scheduler = make(num_blocks=6, host_blocks=8, preemption_mode="swap")
    scheduler.add_request(req("early", list(range(1, 10)), max_tokens=11, ignore_eos=True))
    scheduler.add_request(req("late", list(range(20, 29)), max_tokens=11, ignore_eos=True))
    loop = loop_for(scheduler, overlapped)
    late_seq = scheduler.requests["late"].seqs[0].seq_id
    saw_swap_out = saw_swap_in = False
    registrations = 0

    def check(step: StepInput) -> None:
        nonlocal saw_swap_out, saw_swap_in, registrations
        assert_block_accounting(scheduler)
        saw_swap_out |= bool(step.swap_out)
        saw_swap_in |= bool(step.swap_in)
        assert not (step.swap_out and step.swap_in)
        if late_seq in step.freed_seq_ids:
            assert "late" not in scheduler.requests  # the worker keeps a swapped sequence
        registrations += sum(1 for new in step.new_seqs if new.seq_id == late_seq)

    loop.run(500, after_step=check)
    assert saw_swap_out and saw_swap_in
    assert registrations == 1
    stats = scheduler.stats()
    assert stats.swaps_out > 0 and stats.swaps_in == stats.swaps_out
    assert stats.preemptions >= 1
    out = texts(loop.outputs)
    assert len(out["early"][0]) == 11 and len(out["late"][0]) == 11
    assert_block_accounting(scheduler)


def test_swap_falls_back_to_recompute_without_host_blocks() -> None:
    scheduler = make(num_blocks=6, host_blocks=0, preemption_mode="swap")
    scheduler.add_request(req("early", list(range(1, 10)), max_tokens=11, ignore_eos=True))
    scheduler.add_request(req("late", list(range(20, 29)), max_tokens=11, ignore_eos=True))
    loop = loop_for(scheduler, overlapped=True)
    run(loop)
    assert scheduler.stats().preemptions >= 1 and scheduler.stats().swaps_out == 0


@ORDERS
def test_parallel_sampling_request_is_preempted_whole(overlapped: bool) -> None:
    scheduler = make(num_blocks=10)
    scheduler.add_request(req("single", list(range(1, 10)), max_tokens=20, ignore_eos=True))
    scheduler.add_request(req("group", list(range(30, 36)), n=3, max_tokens=8, ignore_eos=True))
    loop = loop_for(scheduler, overlapped)
    group = scheduler.requests["group"]

    def check(step: StepInput) -> None:
        assert_block_accounting(scheduler)
        # All waiting or all admitted (running, or awaiting a recomputed prompt), never split.
        admitted = {seq for seq in group.live_seqs() if seq.status is SequenceStatus.RUNNING}
        if admitted:
            assert admitted | set(group.awaiting_shared_prompt) == set(group.live_seqs())

    loop.run(1000, after_step=check)
    assert group.num_preemptions >= 1
    out = texts(loop.outputs)
    assert [len(out["group"][index]) for index in range(3)] == [8, 8, 8]


@ORDERS
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "no-cache"])
def test_recomputed_parallel_request_shares_its_prompt_again(overlapped: bool, prefix_caching: bool) -> None:
    # 12 blocks. The group (prompt 4 blocks, n=4, 24 tokens per sequence) peaks at 4 shared + 4 x 2
    # own blocks, so it fits alone; beside "early" it does not, and is preempted after its first
    # tokens. Recomputed with a prompt copy per sequence it would need 4 x 6 = 24 blocks and never
    # be admitted again.
    scheduler = make(num_blocks=12, prefix_caching=prefix_caching)
    scheduler.add_request(req("early", [1, 2, 3, 4], max_tokens=16, ignore_eos=True))
    scheduler.add_request(req("group", list(range(30, 46)), n=4, max_tokens=8, ignore_eos=True))
    group = scheduler.requests["group"]
    loop = loop_for(scheduler, overlapped)
    peak_held = 0

    def check(step: StepInput) -> None:
        nonlocal peak_held
        assert_block_accounting(scheduler)
        tables = [scheduler.kv.block_table(seq.seq_id) for seq in group.seqs if scheduler.kv.holds(seq)]
        peak_held = max(peak_held, len({block for table in tables for block in table}))

    loop.run(500, after_step=check)
    assert group.num_preemptions >= 1 and group.forked
    assert peak_held <= scheduler.kv.peak_blocks(16, 24, 4) == 12
    out = texts(loop.outputs)
    assert [len(out["group"][index]) for index in range(4)] == [8, 8, 8, 8]
    assert_block_accounting(scheduler)


def test_parallel_request_preempted_before_its_first_tokens_forks_anew() -> None:
    # Overlapped: the group is preempted in the step after its fork, before the forking step's
    # tokens arrive, so its sequences hold only the block-aligned prompt. It recomputes the prompt
    # once and forks again; sharing the full prompt blocks instead would leave the children no
    # token to compute and the request would never finish.
    scheduler = make(num_blocks=6, max_num_batched_tokens=8)
    scheduler.add_request(req("early", [1, 2, 3, 4, 5, 6, 7], max_tokens=10, ignore_eos=True))
    scheduler.add_request(req("group", list(range(30, 38)), n=2, max_tokens=4, ignore_eos=True))
    group = scheduler.requests["group"]
    loop = loop_for(scheduler, overlapped=True)
    forks = 0

    def check(step: StepInput) -> None:
        nonlocal forks
        assert_block_accounting(scheduler)
        forks += sum(1 for scheduled in step.scheduled if scheduled.fork_ids)

    loop.run(500, after_step=check)
    assert group.num_preemptions >= 1 and forks >= 2
    assert [len(texts(loop.outputs)["group"][index]) for index in range(2)] == [4, 4]


@pytest.mark.parametrize("trial", [4, 97, 117])
def test_random_trials_that_got_stuck_or_livelocked_finish(trial: int) -> None:
    # Replays trials of a random search (notes: repro_stuck_scheduler.py). 4 and 97 got stuck with
    # n > 1 requests waiting and an empty pool; 117 livelocked, an n = 4 request preempting itself
    # ~1500 times in 3000 steps.
    rng = random.Random(trial)
    num_blocks = rng.choice([12, 25, 40])
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=rng.choice([64, 256, 2048])),
        CacheConfig(block_size=16),
        num_blocks,
        max_model_len=128,
    )
    loop = StepLoop(scheduler, SimulatedWorker(num_blocks, 16), overlapped=rng.random() < 0.5)
    accepted = []
    for index in range(rng.randint(2, 10)):
        prompt = [rng.randint(3, 400) for _ in range(rng.randint(5, 100))]
        params = SamplingParams(n=rng.choice([1, 2, 4]), max_tokens=rng.randint(1, 128 - len(prompt)), ignore_eos=True)
        request = Request(f"r{index}", prompt, params)
        try:
            scheduler.add_request(request)
        except AdmissionError:
            continue
        accepted.append(request)
    assert any(request.params.n > 1 for request in accepted)
    run(loop, max_steps=3000)
    assert all(request.finished for request in accepted)
    assert scheduler.stats().preemptions < 100


def _random_traffic_leaves_nothing_unfinished(seed: int, policy: str, mode: str) -> list[str]:
    """Requests arriving while others run, two steps in flight as the engine keeps them (the step
    pipeline); returns the ids of accepted requests that never finished."""
    rng = random.Random(seed)
    scheduler = Scheduler(
        SchedulerConfig(
            scheduling_policy=policy,  # type: ignore[arg-type]
            kv_watermark=0.0,
            max_num_batched_tokens=rng.choice([8, 16, 64]),
            preemption_mode=mode,  # type: ignore[arg-type]
        ),
        CacheConfig(block_size=4),
        num_blocks=rng.choice([12, 16, 24]),
        max_model_len=48,
        num_host_blocks=16,
    )

    def execute(step: StepInput) -> StepOutput:
        results = []
        for scheduled in step.scheduled:
            if scheduled.sample:
                for seq_id in (scheduled.seq_id, *scheduled.fork_ids):
                    results.append(SeqResult(seq_id, rng.randrange(3, 500)))
        return StepOutput(step_id=step.step_id, results=results)

    loop = LocalStepLoop(scheduler, execute, depth=2)
    accepted: list[Request] = []
    prefix = [rng.randrange(3, 500) for _ in range(12)]
    for iteration in range(600):
        if iteration < 60 and rng.random() < 0.4:
            prompt = prefix[: rng.randrange(0, 12)] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 14))]
            params = SamplingParams(max_tokens=rng.randrange(1, 16), n=rng.choice([1, 1, 2, 3]))
            request = Request(f"r{iteration}", prompt, params, priority=rng.randrange(0, 3))
            with contextlib.suppress(AdmissionError):
                scheduler.add_request(request)
                accepted.append(request)
        loop.step()
        assert_block_accounting(scheduler)
    loop.drain()
    return [request.request_id for request in accepted if not request.finished]


# Seeds whose traffic leaves requests unfinished when a request re-admitted in its preemption step
# drops that step's results (fencing the step being built as stale).
@pytest.mark.parametrize(
    ("seed", "policy", "mode"),
    [(71, "priority", "recompute"), (155, "priority", "recompute"), (23, "priority", "swap"), (95, "priority", "swap")],
)
def test_request_preempted_and_readmitted_in_one_step_keeps_its_results(seed: int, policy: str, mode: str) -> None:
    """Priority preemption can free a request and admit it again within the same step; the results
    of that step are its own and must not be ignored (it would never be scheduled again)."""
    assert _random_traffic_leaves_nothing_unfinished(seed, policy, mode) == []
