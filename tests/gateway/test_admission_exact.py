"""With output lengths known exactly (every request runs to max_tokens: ignore_eos, as pagedctl
bench sends), the demand forecast is exact: predictive admission must then never over-commit, so no
running sequence ever waits for a block and none is preempted, whatever arrives, on any pool that
holds each request alone. A property test over random traffic (shared system prompts, n > 1) in
both call orders and both orders of decodes and prefills.

The token budget holds every prompt that arrives at once: a prefill chunked over several steps
starts decoding, and so ends, later than the forecast assumes (docs/admission.md)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.engine_client import AdmissionError
from paged.shared.protocol import StepInput
from support.scheduler_steps import ORDERS, loop_for, make, req

SYSTEM_PROMPTS = [list(range(1, 11)), list(range(11, 17)), []]
EXAMPLES = int(os.environ.get("PAGED_HYPOTHESIS_EXAMPLES", "60"))

arrival = st.fixed_dictionaries(
    {
        "system": st.sampled_from(range(len(SYSTEM_PROMPTS))),
        "suffix": st.lists(st.integers(20, 60), min_size=1, max_size=14),
        "max_tokens": st.integers(1, 30),
        "n": st.sampled_from([1, 1, 1, 2, 3]),
        "at_step": st.integers(0, 30),
    }
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=st.lists(arrival, min_size=2, max_size=16),
    num_blocks=st.integers(8, 40),
    policy=st.sampled_from(["decode-first", "prefill-first"]),
    overlapped=st.booleans(),
)
def test_exact_lengths_never_wait_or_preempt(
    arrivals: list[dict], num_blocks: int, policy: str, overlapped: bool
) -> None:
    scheduler = make(
        num_blocks, admission_policy="predictive", kv_admission_cap=1.0, scheduling_policy=policy,
        max_num_batched_tokens=2048, max_num_seqs=8,
    )  # fmt: skip
    loop = loop_for(scheduler, overlapped)
    pending = sorted(enumerate(arrivals), key=lambda item: item[1]["at_step"])
    accepted: set[str] = set()
    step = 0

    def check(_: StepInput) -> None:
        assert_block_accounting(scheduler)
        stats = scheduler.stats()
        assert stats.preemptions == 0 and stats.block_waits == 0

    while pending or scheduler.needs_step() or loop.pipeline.num_in_flight:
        while pending and pending[0][1]["at_step"] <= step:
            index, spec = pending.pop(0)
            prompt = SYSTEM_PROMPTS[spec["system"]] + spec["suffix"]
            request = req(f"r{index}", prompt, max_tokens=spec["max_tokens"], n=spec["n"], ignore_eos=True, seed=index)
            try:
                scheduler.add_request(request)
            except AdmissionError:
                continue  # its peak alone exceeds the pool
            accepted.add(request.request_id)
        if scheduler.needs_step():
            check(loop.step())
        else:
            loop.drain()
        step += 1
        assert step < 5000
    finished = {output.request_id for output in loop.outputs if output.finished}
    assert finished == accepted


@ORDERS
def test_requests_admitted_in_one_step_hitting_a_block_one_running_sequence_holds(overlapped: bool) -> None:
    # 7 blocks of 4 tokens; a holds the system prompt's block alone (its row frees it when a ends).
    # c and d arrive together and both hit it. c is admitted first and counts the block as its own
    # (it frees it at its end, at once). When d is probed two tables hold the block, but both rows
    # that count it end long before d: d's hit must cost the block, or d and e (which grow to their
    # peaks together) are one block short and a sequence waits.
    system = [1, 2, 3, 4]
    scheduler = make(7, admission_policy="predictive", kv_admission_cap=1.0, max_num_seqs=8)
    loop = loop_for(scheduler, overlapped)
    scheduler.add_request(req("a", system + [5], max_tokens=2, ignore_eos=True))
    scheduler.add_request(req("e", [50, 51, 52, 53], max_tokens=10, ignore_eos=True))
    loop.step()
    c = req("c", system + [6], max_tokens=1, ignore_eos=True)
    scheduler.add_request(c)
    scheduler.add_request(req("d", system + [7], max_tokens=9, ignore_eos=True))
    loop.step()
    assert c.first_scheduled_time is not None  # d was probed after c took its hit
    loop.run(500, after_step=lambda step: assert_block_accounting(scheduler))
    stats = scheduler.stats()
    assert stats.preemptions == 0 and stats.block_waits == 0
    assert {output.request_id for output in loop.outputs if output.finished} == {"a", "c", "d", "e"}
