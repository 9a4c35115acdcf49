"""A running sequence that finds no free block waits for a finishing one to free some, instead of
preempting (predictive admission): counted in paged_block_waits_total, bounded to
MAX_BLOCK_WAIT_STEPS steps in a row, and never when nothing else progresses (no step in flight
ending a sequence either)."""

from __future__ import annotations

import pytest

from paged.gateway import step_planner
from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.scheduler import Scheduler
from paged.shared.protocol import StepInput
from support.scheduler_steps import EOS, ORDERS, loop_for, make, req, texts

# Output tokens each request generates before its EOS (they all ask for up to 40).
LENGTHS = {"a": 12, "b": 14, "c": 20}


def over_optimistic(num_blocks: int, max_output: int = 40, scheduling_policy: str = "decode-first") -> Scheduler:
    """Predictive admission that has learned that sequences use up to a fifth of max_tokens and keeps
    no margin for error: requests that then run longer over-commit the pool."""
    scheduler = make(
        num_blocks, admission_policy="predictive", kv_admission_cap=1.0, max_num_seqs=8, scheduling_policy=scheduling_policy
    )
    for index in range(64):
        scheduler.figures.lengths.observe(1 + index % (max_output // 5), max_output)
    margin = scheduler.figures.margin
    margin.floor = margin.z = -100.0
    return scheduler


def run_lengths(scheduler: Scheduler, overlapped: bool) -> tuple[dict[str, dict[int, list[int]]], list[int]]:
    ends = {}
    for offset, (request_id, length) in enumerate(LENGTHS.items()):
        request = req(request_id, [10 * offset + 1, 2, 3, 4, 5, 6], max_tokens=40)
        scheduler.add_request(request)
        ends[request.seqs[0].seq_id] = 6 + length - 1
    loop = loop_for(scheduler, overlapped, choose_token=lambda seq_id, position: EOS if position >= ends[seq_id] else 5)
    waits: list[int] = []

    def check(step: StepInput) -> None:
        assert_block_accounting(scheduler)
        assert all(seq.block_waits <= step_planner.MAX_BLOCK_WAIT_STEPS for seq in scheduler.queues.running)
        waits.append(scheduler.stats().block_waits)

    loop.run(1000, after_step=check)
    assert scheduler.requests == {} and scheduler.stats().used_blocks == 0
    return texts(loop.outputs), waits


@ORDERS
def test_a_sequence_short_of_blocks_waits_for_one_that_finishes(overlapped: bool) -> None:
    # 13 blocks of 4 tokens: a, b and c peak at 5, 5 and 7 blocks. Admitted together on the learned
    # lengths, they run short when a is about to end; b or c waits for its blocks instead of preempting.
    scheduler = over_optimistic(13)
    out, waits = run_lengths(scheduler, overlapped)
    assert {request_id: len(tokens[0]) for request_id, tokens in out.items()} == LENGTHS
    stats = scheduler.stats()
    assert stats.preemptions == 0 and stats.recomputed_tokens == 0
    assert stats.block_waits > 0
    # Waiting ends: the counter stops growing once a's blocks are free.
    assert waits[-1] == stats.block_waits and waits.index(stats.block_waits) < len(waits) - 1


@ORDERS
def test_without_waiting_the_same_traffic_preempts(overlapped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_planner, "MAX_BLOCK_WAIT_STEPS", 0)
    scheduler = over_optimistic(13)
    out, _ = run_lengths(scheduler, overlapped)
    assert {request_id: len(tokens[0]) for request_id, tokens in out.items()} == LENGTHS
    assert scheduler.stats().preemptions >= 1


@ORDERS
def test_nothing_waits_when_no_sequence_could_progress(overlapped: bool) -> None:
    # 6 blocks: two 8-token prompts (2 blocks each) both need a new block at the same step and nothing
    # else runs, so waiting would wait forever: the tail is preempted at once.
    scheduler = over_optimistic(6, max_output=16)
    scheduler.add_request(req("early", list(range(1, 9)), max_tokens=16))
    scheduler.add_request(req("late", list(range(20, 28)), max_tokens=16))
    loop = loop_for(scheduler, overlapped, choose_token=lambda seq_id, position: EOS if position >= 20 else 5)
    loop.run(1000, after_step=lambda step: assert_block_accounting(scheduler))
    out = texts(loop.outputs)
    assert len(out["early"][0]) == len(out["late"][0]) == 13
    stats = scheduler.stats()
    assert stats.preemptions >= 1 and stats.block_waits == 0


@ORDERS
def test_under_the_priority_policy_an_important_sequence_never_waits_on_a_less_important_one(overlapped: bool) -> None:
    # The traffic of the first test with one important request: when it finds the pool full it
    # preempts the less important tail at once, as a waiting request of its priority would.
    scheduler = over_optimistic(13, scheduling_policy="priority")
    lengths = {"a": 12, "b": 14, "vip": 20}
    ends = {}
    for offset, (request_id, length) in enumerate(lengths.items()):
        request = req(request_id, [10 * offset + 1, 2, 3, 4, 5, 6], priority=0 if request_id == "vip" else 1, max_tokens=40)
        scheduler.add_request(request)
        ends[request.seqs[0].seq_id] = 6 + length - 1
    vip = request.seqs[0]
    loop = loop_for(scheduler, overlapped, choose_token=lambda seq_id, position: EOS if position >= ends[seq_id] else 5)
    vip_waits = 0

    def check(step: StepInput) -> None:
        nonlocal vip_waits
        assert_block_accounting(scheduler)
        vip_waits = max(vip_waits, vip.block_waits)

    loop.run(1000, after_step=check)
    assert {request_id: len(tokens[0]) for request_id, tokens in texts(loop.outputs).items()} == lengths
    assert vip_waits == 0 and vip.request.num_preemptions == 0
    assert scheduler.stats().preemptions >= 1


def test_greedy_admission_preempts_without_waiting() -> None:
    scheduler = make(13, admission_policy="greedy")
    out, _ = run_lengths(scheduler, overlapped=True)
    assert {request_id: len(tokens[0]) for request_id, tokens in out.items()} == LENGTHS
    assert scheduler.stats().block_waits == 0 and scheduler.stats().preemptions >= 1


@ORDERS
def test_a_sequence_whose_last_token_is_in_flight_is_waited_for(overlapped: bool) -> None:
    # 5 blocks of 4 tokens. "ends" (8-token prompt, 5 out) holds 3 blocks and samples its last token
    # in step 4; "grows" (4-token prompt, up to 16 out) needs its third block in step 5. Overlapped,
    # step 5 is planned before step 4's result frees "ends": nothing else is scheduled in step 5, but
    # a step in flight ends a sequence, so "grows" waits a step instead of preempting itself.
    scheduler = over_optimistic(5)
    scheduler.add_request(req("ends", list(range(1, 9)), max_tokens=5, ignore_eos=True))
    scheduler.add_request(req("grows", list(range(20, 24)), max_tokens=16, ignore_eos=True))
    loop = loop_for(scheduler, overlapped)
    loop.run(1000, after_step=lambda step: assert_block_accounting(scheduler))
    out = texts(loop.outputs)
    assert len(out["ends"][0]) == 5 and len(out["grows"][0]) == 16
    stats = scheduler.stats()
    assert stats.preemptions == 0 and stats.recomputed_tokens == 0
    assert stats.block_waits == (1 if overlapped else 0)


@ORDERS
def test_a_request_moved_off_a_lost_worker_waits_afresh(overlapped: bool) -> None:
    # The steps a sequence waited on a worker that was lost say nothing of the pool it moves to: it
    # may wait its MAX_BLOCK_WAIT_STEPS steps there too.
    scheduler = over_optimistic(13)
    for offset, request_id in enumerate(LENGTHS):
        scheduler.add_request(req(request_id, [10 * offset + 1, 2, 3, 4, 5, 6], max_tokens=40))
    loop = loop_for(scheduler, overlapped, choose_token=lambda seq_id, position: 5)
    while not any(seq.block_waits for seq in scheduler.queues.running):
        loop.step()
        assert loop.num_steps < 200
    taken = scheduler.take_all_requests()
    assert [seq.block_waits for request in taken for seq in request.seqs] == [0] * len(LENGTHS)
