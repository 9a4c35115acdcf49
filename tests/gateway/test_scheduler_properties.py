"""Property-based scheduler tests: random arrivals (shared prefixes, n > 1, priorities, salts),
eos, aborts and both call orders on a small pool, for every policy, admission policy, preemption
mode and allocator.
After every step: the block accounting holds, the token budget and max_num_seqs hold, and the
verifying worker reads back exactly the tokens each sequence should see (so prefix hits, copy-on-
write and swaps moved the right data). At the end: no block leaks, every request that was not
aborted finished with all n sequences, within their limits (no starvation).

A second test packs pools that barely hold the requests add_request accepts (n up to 4, long
prompts) so that n > 1 requests are preempted and recomputed often: every accepted request must
still finish, neither stuck in the queue nor preempting itself forever."""

from __future__ import annotations

import os
from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.engine_client import AdmissionError, Refusal
from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.protocol import StepInput
from paged.shared.sampling_params import SamplingParams

BS = 4
EOS = 0
SYSTEM_PROMPTS = [list(range(1, 11)), list(range(11, 17)), []]

arrival = st.fixed_dictionaries(
    {
        "system": st.sampled_from(range(len(SYSTEM_PROMPTS))),
        "suffix": st.lists(st.integers(1, 30), min_size=1, max_size=14),
        "max_tokens": st.integers(1, 14),
        "n": st.sampled_from([1, 1, 1, 2, 3, 4]),
        "priority": st.integers(0, 2),
        "salt": st.sampled_from([None, None, "tenant"]),
        "ignore_eos": st.booleans(),
    }
)
action = st.one_of(
    st.tuples(st.just("arrive"), arrival),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
)


# PAGED_HYPOTHESIS_EXAMPLES=2000 for a longer hunt; the defaults keep the suite fast.
EXAMPLES = int(os.environ.get("PAGED_HYPOTHESIS_EXAMPLES", "60"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=st.lists(action, min_size=5, max_size=40),
    policy=st.sampled_from(["decode-first", "prefill-first", "priority"]),
    admission=st.sampled_from(["predictive", "greedy"]),
    preemption=st.sampled_from(["recompute", "swap", "auto"]),
    allocator=st.sampled_from(["paged", "paged", "contiguous"]),
    prefix_caching=st.booleans(),
    overlapped=st.booleans(),
    num_blocks=st.integers(12, 40),
    budget=st.one_of(st.integers(4, 40), st.just(64)),
    max_num_seqs=st.integers(1, 8),
    eos_every=st.integers(5, 40),
)
def test_random_workloads_keep_every_invariant(
    actions: list,
    policy: str,
    admission: str,
    preemption: str,
    allocator: str,
    prefix_caching: bool,
    overlapped: bool,
    num_blocks: int,
    budget: int,
    max_num_seqs: int,
    eos_every: int,
) -> None:
    scheduler = Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            scheduling_policy=policy,
            admission_policy=admission,
            preemption_mode=preemption,
            kv_watermark=0.05,
            max_waiting_requests=20,
        ),
        CacheConfig(block_size=BS, enable_prefix_caching=prefix_caching, kv_allocator=allocator),
        num_blocks,
        max_model_len=48,
        num_host_blocks=12,
    )

    stable_ids: dict[int, int] = {}  # seq ids are global counters: sample from stable ones so runs replay

    def choose_token(seq_id: int, position: int) -> int:
        value = (stable_ids[seq_id] * 31 + position * 17) % (eos_every * 7)
        return EOS if value == 3 else 1 + value % 29

    worker = SimulatedWorker(num_blocks, BS, 12, choose_token=choose_token)
    loop = StepLoop(scheduler, worker, overlapped=overlapped)
    admitted: dict[str, Request] = {}
    aborted: set[str] = set()

    def check(step: StepInput) -> None:
        assert_block_accounting(scheduler)
        # The work counters: what the worker computed, of which what it computed before.
        stats = scheduler.stats()
        assert stats.computed_tokens == worker.num_tokens_computed
        assert 0 <= stats.recomputed_tokens <= stats.computed_tokens
        assert stats.recomputed_tokens == 0 or stats.preemptions > 0
        assert sum(s.num_tokens for s in step.scheduled) <= budget
        assert len(step.scheduled) <= max_num_seqs
        assert scheduler.num_running <= max_num_seqs

    for index, (kind, arg) in enumerate(actions):
        if kind == "arrive":
            prompt = SYSTEM_PROMPTS[arg["system"]] + arg["suffix"]
            request = Request(
                f"r{index}",
                prompt,
                SamplingParams(n=arg["n"], max_tokens=arg["max_tokens"], ignore_eos=arg["ignore_eos"], seed=index),
                eos_token_ids=frozenset({EOS}),
                priority=arg["priority"],
                cache_salt=arg["salt"],
            )
            for seq in request.seqs:
                stable_ids[seq.seq_id] = index * 8 + seq.index
            try:
                scheduler.add_request(request)
            except AdmissionError as error:
                assert error.kind in (Refusal.TOO_LARGE, Refusal.QUEUE_FULL)
                continue
            admitted[request.request_id] = request
        elif kind == "step":
            for _ in range(arg):
                check(loop.step())
        elif admitted:
            request_id = sorted(admitted)[arg % len(admitted)]
            if scheduler.abort_request(request_id):
                aborted.add(request_id)
            assert_block_accounting(scheduler)

    loop.run(max_steps=loop.num_steps + 3000, after_step=check)

    assert_block_accounting(scheduler)
    stats = scheduler.stats()
    assert stats.used_blocks == 0 and stats.running_seqs == 0 and stats.waiting_requests == 0 and stats.swapped_requests == 0
    if allocator == "paged":
        assert scheduler.kv.stats().host_free_blocks == 12
    assert worker.seqs == {}  # every sequence the worker held was freed
    reported: dict[tuple[str, int], list[int]] = defaultdict(list)
    finished: set[str] = set()
    for output in loop.outputs:
        for delta in output.deltas:
            reported[output.request_id, delta.index] += delta.token_ids
        if output.finished:
            finished.add(output.request_id)
    for request_id, request in admitted.items():
        if request_id in aborted:
            continue
        assert request_id in finished, f"{request_id} never finished"
        for seq in request.seqs:
            tokens = reported[request_id, seq.index]
            assert tokens == seq.output_token_ids
            assert 1 <= len(tokens) <= request.params.max_tokens
            assert seq.finish_reason in ("stop", "length")
            if seq.finish_reason == "length":
                assert len(seq.token_ids) == min(len(request.prompt_token_ids) + request.params.max_tokens, 48)
            else:
                assert tokens[-1] == EOS and EOS not in tokens[:-1]


# Long prompts and outputs in a 48-token window: one sequence takes up to 12 of the 12 to 40 blocks.
tight_arrival = st.fixed_dictionaries(
    {
        "prompt_len": st.integers(1, 40),
        "max_tokens": st.integers(1, 47),
        "n": st.sampled_from([1, 2, 4]),
        "priority": st.integers(0, 3),
    }
)


# Cheap examples, and a stuck queue needs a rare mix (an n > 1 request preempted at the right
# moment on the right pool): five times as many examples find it reliably.
@settings(max_examples=5 * EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrivals=st.lists(tight_arrival, min_size=2, max_size=10),
    policy=st.sampled_from(["decode-first", "prefill-first", "priority"]),
    admission=st.sampled_from(["predictive", "greedy"]),
    allocator=st.sampled_from(["paged", "paged", "contiguous"]),
    prefix_caching=st.booleans(),
    overlapped=st.booleans(),
    num_blocks=st.integers(12, 40),
    budget=st.sampled_from([4, 16, 64, 512]),
)
def test_every_accepted_request_finishes_on_a_tight_pool(
    arrivals: list,
    policy: str,
    admission: str,
    allocator: str,
    prefix_caching: bool,
    overlapped: bool,
    num_blocks: int,
    budget: int,
) -> None:
    scheduler = Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, scheduling_policy=policy, admission_policy=admission, kv_watermark=0.0),
        CacheConfig(block_size=BS, enable_prefix_caching=prefix_caching, kv_allocator=allocator),
        num_blocks,
        max_model_len=48,
    )
    loop = StepLoop(scheduler, SimulatedWorker(num_blocks, BS), overlapped=overlapped)
    accepted = []
    for index, arg in enumerate(arrivals):
        prompt = [1 + (index * 7 + position) % 29 for position in range(arg["prompt_len"])]
        params = SamplingParams(n=arg["n"], max_tokens=arg["max_tokens"], ignore_eos=True)
        request = Request(f"r{index}", prompt, params, priority=arg["priority"])
        try:
            scheduler.add_request(request)
        except AdmissionError as error:
            assert error.kind is Refusal.TOO_LARGE
            continue
        accepted.append(request)

    loop.run(max_steps=3000, after_step=lambda _: assert_block_accounting(scheduler))

    assert scheduler.stats().used_blocks == 0
    for request in accepted:
        assert request.finished, f"{request.request_id} never finished"
        for seq in request.seqs:
            assert len(seq.token_ids) == min(request.num_prompt_tokens + request.params.max_tokens, 48)
