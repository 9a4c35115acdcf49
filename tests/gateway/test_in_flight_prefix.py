"""Prefix hits on blocks a step in flight computes (gateway/in_flight_blocks.py) and the wait of a
request whose prompt continues with blocks the step being planned computes (step_planner.py): a
burst of requests with one system prompt computes it once. The simulated worker checks that every
slot a sequence reads holds the right token, so a hit on a block not yet written fails the run."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paged.gateway.block_accounting import assert_block_accounting
from paged.ops.sim_worker import SimulatedWorker
from paged.shared.protocol import SeqError, SeqResult, StepOutput
from support.scheduler_steps import BS, ORDERS, loop_for, make, req, run, texts

SYSTEM = list(range(1, 13))  # 3 full blocks


@ORDERS
def test_a_burst_with_one_system_prompt_computes_it_once(overlapped: bool) -> None:
    scheduler = make()
    for i in range(4):
        scheduler.add_request(req(f"r{i}", SYSTEM + [40 + i, 50 + i], max_tokens=3))
    loop = loop_for(scheduler, overlapped)
    first = loop.step()
    # The others wait for the first's blocks rather than compute the same tokens in their own.
    assert [s.num_tokens for s in first.scheduled] == [14]
    second = loop.step()
    assert sorted((s.start, s.num_tokens) for s in second.scheduled if s.num_tokens > 1) == [(12, 2)] * 3
    run(loop)
    outputs = [o for o in loop.outputs if o.deltas and o.request_id != "r0"]
    assert {o.request_id: o.num_cached_tokens for o in outputs if o.num_cached_tokens} == {"r1": 12, "r2": 12, "r3": 12}
    stats = scheduler.stats()
    assert stats.computed_tokens == 14 + 3 * 2 + 4 * 2  # prompts once, then two decodes each
    assert all(len(tokens[0]) == 3 for tokens in texts(loop.outputs).values())


def test_blocks_in_flight_are_hits_for_the_next_step_but_not_for_routing() -> None:
    scheduler = make()
    worker = SimulatedWorker(scheduler.kv.num_blocks, BS)
    scheduler.add_request(req("a", SYSTEM + [40], max_tokens=2))
    step0 = scheduler.schedule()
    scheduler.add_request(req("b", SYSTEM + [50], max_tokens=2))
    step1 = scheduler.schedule()  # before step 0's output is back, as the server's pipeline does
    b_seq = scheduler.requests["b"].seqs[0].seq_id
    (b,) = [s for s in step1.scheduled if s.seq_id == b_seq]
    assert (b.start, b.num_tokens) == (12, 1)
    assert scheduler.prefix_match_tokens(SYSTEM + [50], None) == 0  # the cache proper waits for the output
    out0, out1 = worker.execute(step0), worker.execute(step1)  # the worker verifies b's reads
    scheduler.update(step0, out0)
    scheduler.update(step1, out1)
    assert scheduler.prefix_match_tokens(SYSTEM + [50], None) == 12
    assert len(scheduler.kv.in_flight) == 0  # both steps settled
    assert_block_accounting(scheduler)


def test_a_failed_chunk_fails_the_requests_that_took_its_blocks_in_flight() -> None:
    scheduler = make()
    scheduler.add_request(req("a", SYSTEM + [40], max_tokens=2))
    step0 = scheduler.schedule()
    a_seq = step0.scheduled[0].seq_id
    scheduler.add_request(req("b", SYSTEM + [50], max_tokens=2))
    scheduler.add_request(req("c", [70, 71, 72, 73, 74], max_tokens=2))  # reads none of a's blocks
    step1 = scheduler.schedule()
    outputs = {o.request_id: o for o in scheduler.update(step0, StepOutput(step0.step_id, errors=[SeqError(a_seq, "boom")]))}
    assert outputs["a"].error == "boom"
    assert outputs["b"].finished and "never computed" in (outputs["b"].error or "")
    assert "c" not in outputs and "c" in scheduler.requests
    assert scheduler.prefix_match_tokens(SYSTEM + [50], None) == 0  # nothing of a's reached the cache
    scheduler.update(step1, StepOutput(step1.step_id, results=[SeqResult(s.seq_id, 5) for s in step1.scheduled if s.sample]))
    assert scheduler.requests["c"].seqs[0].token_ids[-1] == 5
    assert_block_accounting(scheduler)


def test_a_preempted_announcer_takes_its_blocks_out_of_the_hits() -> None:
    scheduler = make()
    scheduler.add_request(req("a", SYSTEM + [40], max_tokens=2))
    step0 = scheduler.schedule()
    scheduler.abort_request("a")  # its blocks go back to the pool, to be reused by anyone
    scheduler.add_request(req("b", SYSTEM + [50], max_tokens=2))
    step1 = scheduler.schedule()
    (b,) = step1.scheduled
    assert (b.start, b.num_tokens) == (0, 13)
    worker = SimulatedWorker(scheduler.kv.num_blocks, BS)
    scheduler.update(step0, worker.execute(step0))
    scheduler.update(step1, worker.execute(step1))
    assert_block_accounting(scheduler)


@ORDERS
def test_a_request_waiting_for_blocks_in_this_step_lets_the_next_one_in(overlapped: bool) -> None:
    scheduler = make()
    scheduler.add_request(req("a", SYSTEM + [40], max_tokens=2))
    scheduler.add_request(req("b", SYSTEM + [50], max_tokens=2))
    scheduler.add_request(req("c", [70, 71, 72, 73, 74], max_tokens=2))
    loop = loop_for(scheduler, overlapped)
    step0 = loop.step()
    ids = {scheduler_seq.seq_id: name for name in "abc" for scheduler_seq in scheduler.requests[name].seqs}
    assert sorted(ids[s.seq_id] for s in step0.scheduled) == ["a", "c"]
    run(loop)
    b = [o for o in loop.outputs if o.request_id == "b" and o.deltas]
    assert b[0].num_cached_tokens == 12


SYSTEMS = [SYSTEM, list(range(20, 29)), SYSTEM[:8]]  # 3, 2 and 2 full blocks; the third a prefix of the first


@settings(max_examples=int(os.environ.get("PAGED_HYPOTHESIS_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    actions=st.lists(
        st.one_of(
            st.tuples(st.just("arrive"), st.integers(0, len(SYSTEMS) - 1), st.lists(st.integers(30, 60), min_size=1, max_size=6),
                      st.integers(1, 10), st.sampled_from([1, 1, 2])),  # fmt: skip
            st.tuples(st.just("step")),
            st.tuples(st.just("abort"), st.integers(0, 50)),
        ),
        min_size=3,
        max_size=40,
    ),
    preemption=st.sampled_from(["recompute", "swap"]),
    num_blocks=st.integers(8, 30),
    budget=st.integers(4, 40),
)
def test_bursts_over_steps_in_flight_read_only_written_blocks(
    actions: list[tuple], preemption: str, num_blocks: int, budget: int
) -> None:
    """Requests sharing system prompts arrive one step at a time while the pipeline keeps a step in
    flight, on pools tight enough to preempt (recompute or swap) and with aborts: the simulated
    worker fails the run if any sequence reads a slot its step order has not written, and every
    request that was not aborted finishes with its tokens."""
    scheduler = make(num_blocks, max_model_len=48, host_blocks=8, preemption_mode=preemption, max_num_batched_tokens=budget)
    loop = loop_for(scheduler, overlapped=True)
    admitted: dict[str, int] = {}
    aborted: set[str] = set()
    for index, action in enumerate(actions):
        if action[0] == "arrive":
            _, system, suffix, max_tokens, n = action
            prompt = SYSTEMS[system] + suffix
            if len(prompt) + max_tokens > 48 or n * ((len(prompt) + max_tokens) // BS + 1) > num_blocks:
                continue
            scheduler.add_request(req(f"r{index}", prompt, max_tokens=max_tokens, n=n, ignore_eos=True))
            admitted[f"r{index}"] = max_tokens
        elif action[0] == "step":
            loop.step()
            assert_block_accounting(scheduler)
        elif admitted:
            request_id = sorted(admitted)[action[1] % len(admitted)]
            if scheduler.abort_request(request_id):
                aborted.add(request_id)
    run(loop)
    tokens = texts(loop.outputs)
    for request_id, max_tokens in admitted.items():
        if request_id not in aborted:
            assert all(len(t) == max_tokens for t in tokens[request_id].values()), request_id
