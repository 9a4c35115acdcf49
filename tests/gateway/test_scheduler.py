"""Scheduler unit tests against a verifying simulated worker (tests/support/scheduler_steps.py), in
both call orders: simple (schedule, update, schedule, ...) and overlapped (schedule N+1 before
update N). Every scenario ends with the block accounting audit; most also audit after every step.
n > 1 requests and preemption are in test_scheduler_preemption.py."""

from __future__ import annotations

import pytest

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.engine_client import AdmissionError, Refusal
from paged.shared.protocol import SeqError, SeqResult, StepInput, StepOutput
from support.scheduler_steps import EOS, ORDERS, make, req, loop_for, run, texts, finishes


# Basic flow ---------------------------------------------------------------------------------


@ORDERS
def test_single_request_runs_to_max_tokens(overlapped: bool) -> None:
    scheduler = make()
    request = req("a", [5, 6, 7, 8, 9, 10], max_tokens=5)
    scheduler.add_request(request)
    loop = loop_for(scheduler, overlapped)
    first = loop.step()
    seq_id = request.seqs[0].seq_id
    assert [new.seq_id for new in first.new_seqs] == [seq_id]
    (scheduled,) = first.scheduled
    assert (scheduled.start, scheduled.num_tokens, scheduled.table_from, scheduled.sample) == (0, 6, 0, True)
    assert len(scheduled.new_blocks) == 2
    run(loop)
    assert len(texts(loop.outputs)["a"][0]) == 5
    assert finishes(loop.outputs) == {("a", 0): "length"}
    assert loop.outputs[-1].finished
    assert request.seqs[0].output_token_ids == texts(loop.outputs)["a"][0]


def test_overlapped_schedules_the_placeholder_decode_before_the_update() -> None:
    scheduler = make()
    scheduler.add_request(req("a", [1, 2, 3], max_tokens=3))
    first = scheduler.schedule()
    second = scheduler.schedule()  # step 0's result has not arrived
    (scheduled,) = second.scheduled
    assert (scheduled.start, scheduled.num_tokens, scheduled.sample) == (3, 1, True)
    assert scheduled.new_blocks == [] and scheduled.table_from == 1
    third = scheduler.schedule()
    assert [s.start for s in third.scheduled] == [4]
    # max_tokens=3 counts the placeholders: no fourth sampling step is sent.
    assert scheduler.schedule().scheduled == []
    for step, token in zip((first, second, third), (11, 12, 13), strict=True):
        outputs = scheduler.update(step, StepOutput(step.step_id, results=[SeqResult(step.scheduled[0].seq_id, token)]))
    assert outputs[0].finished and outputs[0].deltas[0].finish_reason == "length"
    assert scheduler.schedule().freed_seq_ids == [first.scheduled[0].seq_id]
    assert_block_accounting(scheduler)


@ORDERS
def test_eos_stops_and_the_extra_in_flight_step_is_ignored(overlapped: bool) -> None:
    scheduler = make()
    request = req("a", [1, 2, 3], max_tokens=10)
    scheduler.add_request(request)
    loop = loop_for(scheduler, overlapped, choose_token=lambda seq_id, position: EOS if position == 5 else 9)
    run(loop)
    assert texts(loop.outputs)["a"][0] == [9, 9, EOS]
    assert finishes(loop.outputs) == {("a", 0): "stop"}
    assert loop.worker.seqs == {}  # the worker was told to drop it


@ORDERS
def test_ignore_eos_and_stop_token_ids(overlapped: bool) -> None:
    scheduler = make()
    scheduler.add_request(req("eos-ignored", [1, 2], max_tokens=4, ignore_eos=True))
    scheduler.add_request(req("stop-token", [1, 2], max_tokens=4, stop_token_ids=(9,)))
    loop = loop_for(scheduler, overlapped, choose_token=lambda seq_id, position: EOS if position < 4 else 9)
    run(loop)
    out = texts(loop.outputs)
    assert out["eos-ignored"][0] == [EOS, EOS, 9, 9]
    assert out["stop-token"][0] == [EOS]
    assert finishes(loop.outputs) == {("eos-ignored", 0): "length", ("stop-token", 0): "stop"}


@ORDERS
def test_context_window_stops_with_length(overlapped: bool) -> None:
    scheduler = make(max_model_len=10)
    scheduler.add_request(req("a", list(range(1, 8)), max_tokens=100))
    loop = loop_for(scheduler, overlapped)
    run(loop)
    assert len(texts(loop.outputs)["a"][0]) == 3
    assert finishes(loop.outputs) == {("a", 0): "length"}


def test_logprobs_are_passed_through() -> None:
    scheduler = make()
    scheduler.add_request(req("a", [1, 2], max_tokens=1, logprobs=0))
    step = scheduler.schedule()
    seq_id = step.scheduled[0].seq_id
    (output,) = scheduler.update(step, StepOutput(step.step_id, results=[SeqResult(seq_id, 5, -0.25, [])]))
    assert output.deltas[0].logprobs == [-0.25]
    assert output.deltas[0].top_logprobs == [[]]


# Budgets, chunked prefill, policies ----------------------------------------------------------


@ORDERS
def test_chunked_prefill_respects_the_budget_and_does_not_starve_decodes(overlapped: bool) -> None:
    scheduler = make(max_num_batched_tokens=8)
    scheduler.add_request(req("decoder", [1, 2], max_tokens=12))
    loop = loop_for(scheduler, overlapped)
    loop.step()
    scheduler.add_request(req("long", list(range(1, 30)), max_tokens=2))
    long_seq = scheduler.requests["long"].seqs[0].seq_id
    chunks = []
    for _ in range(5):
        step = loop.step()
        assert sum(s.num_tokens for s in step.scheduled) <= 8
        by_id = {s.seq_id: s for s in step.scheduled}
        assert scheduler.requests["decoder"].seqs[0].seq_id in by_id  # a decode every step
        if long_seq in by_id:
            chunks.append((by_id[long_seq].num_tokens, by_id[long_seq].sample))
    assert chunks[:4] == [(7, False), (7, False), (7, False), (7, False)]
    run(loop)


@ORDERS
def test_max_num_seqs_caps_the_running_batch(overlapped: bool) -> None:
    scheduler = make(max_num_seqs=2)
    for index in range(5):
        scheduler.add_request(req(f"r{index}", [1, 2, 3], max_tokens=3))
    loop = loop_for(scheduler, overlapped)

    def check(step: StepInput) -> None:
        assert len(step.scheduled) <= 2
        assert scheduler.num_running <= 2
        assert_block_accounting(scheduler)

    loop.run(500, after_step=check)
    assert len(texts(loop.outputs)) == 5


def test_decode_first_serves_running_sequences_before_new_prefills() -> None:
    scheduler = make(max_num_batched_tokens=4)
    scheduler.add_request(req("running", [1, 2, 3, 4], max_tokens=5))
    loop = loop_for(scheduler, overlapped=False)
    loop.step()
    scheduler.add_request(req("new", list(range(1, 10))))
    step = loop.step()
    assert [s.num_tokens for s in step.scheduled] == [1, 3]
    assert step.scheduled[0].seq_id == scheduler.requests["running"].seqs[0].seq_id
    run(loop)


def test_prefill_first_admits_new_prompts_before_decodes() -> None:
    scheduler = make(max_num_batched_tokens=4, scheduling_policy="prefill-first")
    scheduler.add_request(req("running", [1, 2, 3, 4], max_tokens=5))
    loop = loop_for(scheduler, overlapped=False)
    loop.step()
    scheduler.add_request(req("new", list(range(1, 10))))
    step = loop.step()
    assert [(s.seq_id, s.num_tokens) for s in step.scheduled] == [(scheduler.requests["new"].seqs[0].seq_id, 4)]
    run(loop)


def test_priority_policy_orders_the_queue_and_preempts_less_important_work() -> None:
    # 6 blocks of 4 tokens: "low" takes 4 for its prompt; "high" needs 3.
    scheduler = make(num_blocks=6, scheduling_policy="priority", max_num_batched_tokens=64)
    scheduler.add_request(req("low", list(range(1, 14)), priority=5, max_tokens=6))
    loop = loop_for(scheduler, overlapped=False)
    loop.step()
    scheduler.add_request(req("later-low", [1, 2], priority=5, max_tokens=2))
    scheduler.add_request(req("high", list(range(20, 30)), priority=0, max_tokens=2))
    assert [r.request_id for r in scheduler.waiting] == ["high", "later-low"]
    step = loop.step()
    high = scheduler.requests["high"].seqs[0].seq_id
    assert high in {s.seq_id for s in step.scheduled}
    assert scheduler.requests["low"].num_preemptions == 1
    assert scheduler.requests["low"].seqs[0].seq_id in step.freed_seq_ids
    run(loop)
    assert set(texts(loop.outputs)) == {"low", "later-low", "high"}


# Prefix caching ----------------------------------------------------------------------------


@ORDERS
def test_prefix_cache_hits_start_after_the_cached_tokens(overlapped: bool) -> None:
    scheduler = make()
    system = list(range(1, 11))  # 2 full blocks + 2 tokens
    scheduler.add_request(req("first", system + [40, 41], max_tokens=2))
    loop = loop_for(scheduler, overlapped)
    run(loop)
    scheduler.add_request(req("second", system + [50], max_tokens=2))
    step = loop.step()
    (scheduled,) = step.scheduled
    assert scheduled.start == 8 and scheduled.num_tokens == 3 and scheduled.table_from == 0
    assert len(scheduled.new_blocks) == 3  # the full table, cache hits included
    run(loop)
    second = [o for o in loop.outputs if o.request_id == "second"]
    assert second[0].num_cached_tokens == 8
    stats = scheduler.stats()
    assert stats.prefix_hits_tokens == 8 and stats.prefix_queries_tokens == 23


def test_an_identical_prompt_still_computes_its_last_token() -> None:
    scheduler = make()
    prompt = list(range(1, 9))  # exactly 2 blocks
    scheduler.add_request(req("a", prompt, max_tokens=1))
    loop = loop_for(scheduler, overlapped=True)
    run(loop)
    scheduler.add_request(req("b", prompt, max_tokens=1))
    (scheduled,) = loop.step().scheduled
    assert (scheduled.start, scheduled.num_tokens, scheduled.sample) == (4, 4, True)
    run(loop)


def test_blocks_join_the_cache_only_after_the_step_result() -> None:
    scheduler = make()
    prompt = list(range(1, 10))
    scheduler.add_request(req("a", prompt, max_tokens=4))
    step = scheduler.schedule()
    assert scheduler.prefix_match_tokens(prompt, None) == 0
    scheduler.update(step, StepOutput(step.step_id, results=[SeqResult(step.scheduled[0].seq_id, 3)]))
    assert scheduler.prefix_match_tokens(prompt, None) == 8
    assert scheduler.prefix_match_tokens(prompt, "other-tenant") == 0
    assert_block_accounting(scheduler)


@ORDERS
def test_prefix_caching_off(overlapped: bool) -> None:
    scheduler = make(prefix_caching=False)
    for name in "ab":
        scheduler.add_request(req(name, list(range(1, 12)), max_tokens=2))
        loop = loop_for(scheduler, overlapped)
        run(loop)
    assert scheduler.stats().prefix_hits_tokens == 0
    assert scheduler.stats().cached_blocks == 0


# Admission -----------------------------------------------------------------------------------


def test_waiting_queue_caps_reject_with_429() -> None:
    scheduler = make(max_waiting_requests=2, max_waiting_tokens=10)
    scheduler.add_request(req("a", [1, 2, 3]))
    scheduler.add_request(req("b", [1, 2, 3]))
    with pytest.raises(AdmissionError) as caught:
        scheduler.add_request(req("c", [1]))
    assert caught.value.kind is Refusal.QUEUE_FULL and "2 requests waiting, limit 2" in caught.value.message
    scheduler.schedule()  # both admitted, the queue drains
    scheduler.add_request(req("c", list(range(1, 9))))
    with pytest.raises(AdmissionError) as caught:
        scheduler.add_request(req("d", [1, 2, 3]))
    assert caught.value.kind is Refusal.QUEUE_FULL and "8 prompt tokens waiting plus 3" in caught.value.message
    assert "limit of 10" in caught.value.message


def test_requests_that_can_never_fit_are_refused_with_400() -> None:
    scheduler = make(num_blocks=4, max_model_len=32)
    with pytest.raises(AdmissionError) as caught:
        scheduler.add_request(req("long", list(range(32))))
    assert caught.value.kind is Refusal.TOO_LARGE and "32 tokens" in caught.value.message and "32 tokens, which" in caught.value.message
    with pytest.raises(AdmissionError) as caught:
        scheduler.add_request(req("big", list(range(10)), max_tokens=10))  # 20 tokens = 5 blocks > 4
    assert caught.value.kind is Refusal.TOO_LARGE and "5 KV blocks" in caught.value.message and "has 4 blocks" in caught.value.message
    scheduler.add_request(req("fits", list(range(10)), max_tokens=6))
    assert_block_accounting(scheduler)


def test_admission_keeps_the_watermark_free() -> None:
    scheduler = make(num_blocks=10, kv_watermark=0.2)  # keep 2 blocks free
    scheduler.add_request(req("a", list(range(1, 17)), max_tokens=2))  # 4 blocks (+1 later)
    scheduler.add_request(req("b", list(range(20, 33)), max_tokens=2))  # 4 blocks: 10 - 4 - 4 = 2 ok
    scheduler.add_request(req("c", [1, 2, 3], max_tokens=2))  # 1 block would leave 1 < 2
    step = scheduler.schedule()
    assert len(step.scheduled) == 2 and scheduler.num_waiting == 1
    assert_block_accounting(scheduler)


# Abort, errors, worker loss ----------------------------------------------------------------


@ORDERS
def test_abort_frees_blocks_at_once(overlapped: bool) -> None:
    scheduler = make(num_blocks=20, host_blocks=8)
    scheduler.add_request(req("running", list(range(1, 10)), max_tokens=20))
    scheduler.add_request(req("waiting", list(range(1, 10)), max_tokens=20))
    scheduler.config.max_num_seqs = 1
    loop = loop_for(scheduler, overlapped)
    loop.step()
    running_seq = scheduler.requests["running"].seqs[0].seq_id
    used = scheduler.stats().used_blocks
    assert used == 3
    reported = len(loop.outputs)
    assert scheduler.abort_request("running")
    assert scheduler.stats().used_blocks == 0
    assert_block_accounting(scheduler)
    assert scheduler.abort_request("waiting")
    assert not scheduler.abort_request("waiting")
    assert not scheduler.abort_request("never-seen")
    step = loop.step()
    assert step.freed_seq_ids == [running_seq]
    loop.drain()
    assert not scheduler.has_unfinished_requests()
    assert loop.outputs[reported:] == []  # a result still in flight for it is ignored
    assert_block_accounting(scheduler)


def test_abort_of_a_swapped_request_frees_its_host_blocks() -> None:
    scheduler = make(num_blocks=6, host_blocks=8, preemption_mode="swap")
    scheduler.add_request(req("early", list(range(1, 10)), max_tokens=11, ignore_eos=True))
    scheduler.add_request(req("late", list(range(20, 29)), max_tokens=11, ignore_eos=True))
    loop = loop_for(scheduler, overlapped=True)
    while not scheduler.swapped:
        loop.step()
    assert scheduler.stats().swapped_requests == 1
    assert scheduler.kv.stats().host_free_blocks < 8
    assert scheduler.abort_request("late")
    assert scheduler.kv.stats().host_free_blocks == 8
    assert_block_accounting(scheduler)
    run(loop)


@ORDERS
def test_worker_error_fails_only_that_request(overlapped: bool) -> None:
    scheduler = make()
    scheduler.add_request(req("bad", [1, 2, 3], max_tokens=4))
    scheduler.add_request(req("good", [1, 2, 3], max_tokens=4))
    bad_seq = scheduler.requests["bad"].seqs[0].seq_id
    step = scheduler.schedule()
    output = StepOutput(
        step.step_id,
        results=[SeqResult(s.seq_id, 5) for s in step.scheduled if s.seq_id != bad_seq],
        errors=[SeqError(bad_seq, "nan in logits")],
    )
    outputs = {o.request_id: o for o in scheduler.update(step, output)}
    assert outputs["bad"].error == "nan in logits" and outputs["bad"].finished
    assert outputs["good"].error is None and outputs["good"].deltas[0].token_ids == [5]
    assert "bad" not in scheduler.requests
    assert bad_seq in scheduler.schedule().freed_seq_ids
    assert_block_accounting(scheduler)


@ORDERS
def test_take_all_requests_resets_them_to_be_recomputed_elsewhere(overlapped: bool) -> None:
    scheduler = make()
    scheduler.add_request(req("a", list(range(1, 10)), max_tokens=6, ignore_eos=True))
    scheduler.add_request(req("b", list(range(1, 6)), n=2, max_tokens=6, ignore_eos=True))
    loop = loop_for(scheduler, overlapped)
    for _ in range(3):
        loop.step()
    taken = scheduler.take_all_requests()
    assert [r.request_id for r in taken] == ["a", "b"]
    assert scheduler.stats().used_blocks == 0 and scheduler.stats().cached_blocks == 0
    assert not scheduler.has_unfinished_requests()
    assert_block_accounting(scheduler)
    generated = {r.request_id: [seq.output_token_ids for seq in r.seqs] for r in taken}
    other = make()
    for request in taken:
        other.add_request(request)
    other_loop = loop_for(other, overlapped)
    run(other_loop)
    for request in taken:
        for seq, before in zip(request.seqs, generated[request.request_id], strict=True):
            assert len(seq.output_token_ids) == 6
            assert seq.output_token_ids[: len(before)] == before


# Stats ------------------------------------------------------------------------------------------


def test_stats_report_blocks_slots_and_utilization() -> None:
    scheduler = make(num_blocks=16)
    scheduler.add_request(req("a", list(range(1, 7)), n=2, max_tokens=4))
    loop = loop_for(scheduler, overlapped=False)
    loop.step()
    stats = scheduler.stats()
    assert (stats.num_blocks, stats.used_blocks, stats.free_blocks, stats.shared_blocks) == (16, 2, 14, 2)
    assert (stats.slots_reserved, stats.slots_filled) == (8, 6)
    assert stats.kv_utilization == pytest.approx(0.75)
    assert (stats.running_seqs, stats.waiting_requests) == (2, 0)
    run(loop)
    # Block 0 is common; block 1 (positions 4-7) differs once the two continuations diverge.
    assert scheduler.stats().cached_blocks == 3


@ORDERS
def test_contiguous_allocator_drives_the_same_scheduler(overlapped: bool) -> None:
    scheduler = make(num_blocks=24, allocator="contiguous")
    scheduler.add_request(req("a", list(range(1, 10)), max_tokens=6, ignore_eos=True))
    scheduler.add_request(req("b", list(range(1, 7)), n=2, max_tokens=6, ignore_eos=True))
    scheduler.add_request(req("c", list(range(1, 10)), max_tokens=30, ignore_eos=True))
    loop = loop_for(scheduler, overlapped)
    run(loop)
    out = texts(loop.outputs)
    assert len(out["a"][0]) == 6 and len(out["b"][1]) == 6 and len(out["c"][0]) == 30
    assert scheduler.stats().preemptions == 0


@ORDERS
def test_contiguous_fork_copies_go_out_in_the_next_step_even_if_the_child_waits(overlapped: bool) -> None:
    # Budget 2: the step after the fork decodes the parent and one child only; the copies for both
    # children still go out then, before the parent (which stops at once) frees blocks to reuse.
    scheduler = make(num_blocks=40, allocator="contiguous", max_num_batched_tokens=6)
    request = req("a", [1, 2, 3, 4, 5, 6], n=3, max_tokens=4)
    scheduler.add_request(request)
    parent = request.seqs[0].seq_id
    loop = loop_for(scheduler, overlapped, choose_token=lambda seq_id, position: EOS if seq_id == parent else 7)
    fork_step = loop.step()
    assert fork_step.scheduled[0].fork_ids
    scheduler.config.max_num_batched_tokens = 2
    next_step = loop.step()
    assert len(next_step.copies) == 2 * 2  # two children x two prompt blocks
    scheduler.add_request(req("reuser", list(range(1, 9)), max_tokens=4))
    run(loop)
    out = texts(loop.outputs)["a"]
    assert out[0] == [EOS] and out[1] == [7] * 4 and out[2] == [7] * 4
