"""A step that cannot be encoded fails only the sequences at fault (gateway/unencodable_items.py):
the rest of the step goes to the worker, the block accounting holds after every step, and a
verifying simulated worker sees a consistent stream of steps."""

from __future__ import annotations

import pytest

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.outputs import RequestOutput
from paged.gateway.unencodable_items import fail_unencodable, split_off_unencodable
from paged.shared.protocol import Codec, NewSequence, ScheduledSeq, StepInput, UnencodableMessage
from paged.shared.sampling_params import SamplingParams
from support.scheduler_steps import ORDERS, finishes, loop_for, make, req, texts

BEYOND = 1 << 64
PROMPT = list(range(1, 14))  # 13 tokens: three full blocks of 4, shared by prefix caching


def test_split_off_names_the_field_and_keeps_the_rest() -> None:
    good = NewSequence(1, [1, 2], SamplingParams())
    bad = NewSequence(2, [1, 2], SamplingParams(seed=BEYOND))
    step = StepInput(
        7,
        scheduled=[ScheduledSeq(1, 0, 2, 0, [3]), ScheduledSeq(2, 0, 2, 0, [4], True, [5])],
        new_seqs=[good, bad],
        freed_seq_ids=[9],
    )
    reasons = split_off_unencodable(step)
    assert list(reasons) == [2] and reasons[2].startswith("sampling.seed: ")
    assert step.new_seqs == [good] and [s.seq_id for s in step.scheduled] == [1] and step.freed_seq_ids == [9]
    Codec().encode(step)


def test_a_fault_no_sequence_owns_is_raised_again() -> None:
    step = StepInput(0, freed_seq_ids=[BEYOND])
    with pytest.raises(UnencodableMessage) as error:
        Codec().encode(step)
    with pytest.raises(UnencodableMessage):
        fail_unencodable(make(), step, error.value, "0")


@ORDERS
@pytest.mark.parametrize(
    "bad_prompt, bad_params",
    [
        (PROMPT, {"seed": BEYOND}),
        (PROMPT, {"n": 3, "stop_token_ids": (0, -BEYOND)}),
        ([*PROMPT[:8], BEYOND, 5], {}),
        ([9, 9, 9], {"top_k": BEYOND, "n": 2}),
    ],
    ids=["seed-shared-prefix", "n3-stop-token", "prompt-token", "n2-top-k"],
)
def test_only_the_request_at_fault_fails(overlapped: bool, bad_prompt: list[int], bad_params: dict[str, object]) -> None:
    scheduler = make(64, max_num_batched_tokens=24)
    loop = loop_for(scheduler, overlapped)
    codec = Codec()
    failed: list[RequestOutput] = []
    execute = loop.execute

    def encode_then_execute(step: StepInput):  # what the server's step loop does around its link
        try:
            codec.encode(step)
        except UnencodableMessage as error:
            failed.extend(fail_unencodable(scheduler, step, error, "0"))
            codec.encode(step)
        return execute(step)

    loop.execute = encode_then_execute
    scheduler.add_request(req("a", PROMPT, max_tokens=12, ignore_eos=True))
    scheduler.add_request(req("b", [20, 21, 22, 23, 24], n=2, max_tokens=10, ignore_eos=True))
    loop.step()
    loop.step()  # "a" and "b" are computing when the bad one arrives
    scheduler.add_request(req("bad", bad_prompt, max_tokens=6, **bad_params))
    scheduler.add_request(req("c", PROMPT, max_tokens=5, ignore_eos=True))
    loop.run(after_step=lambda _: assert_block_accounting(scheduler))
    assert_block_accounting(scheduler)
    assert [output.request_id for output in failed] == ["bad"]
    assert failed[0].finished and "cannot be sent to the worker" in (failed[0].error or "")
    produced = texts(loop.outputs)
    assert "bad" not in produced
    assert [len(produced["a"][0])] == [12] and [len(produced["b"][i]) for i in (0, 1)] == [10, 10]
    assert len(produced["c"][0]) == 5
    assert set(finishes(loop.outputs).values()) == {"length"}
    assert scheduler.stats().used_blocks == 0 and not scheduler.requests
