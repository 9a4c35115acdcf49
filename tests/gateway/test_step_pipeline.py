"""The step pipeline (gateway/step_pipeline.py): up to `depth` steps in flight, results applied in
step order, empty steps answered in order without being sent, an out-of-order answer refused."""

from __future__ import annotations

import pytest

from paged.gateway.block_accounting import assert_block_accounting
from paged.gateway.step_pipeline import LocalStepLoop, StepOrderError, StepPipeline, is_empty
from paged.shared.protocol import SeqResult, StepInput, StepOutput
from support.scheduler_steps import make, req


def sampled(step: StepInput, token: int = 7) -> StepOutput:
    """The worker's answer: one token per sequence the step samples."""
    return StepOutput(step.step_id, results=[SeqResult(s.seq_id, token) for s in step.scheduled if s.sample])


def test_two_steps_in_flight_then_results_in_step_order() -> None:
    scheduler = make()
    scheduler.add_request(req("a", [1, 2, 3], max_tokens=3))
    pipeline = StepPipeline(scheduler, depth=2)
    sent = []
    while pipeline.wants_step():
        sent.append(pipeline.schedule())
    assert [step.step_id for step in sent] == [0, 1] and pipeline.num_in_flight == 2
    assert not pipeline.wants_step()  # full
    (output,) = pipeline.complete(sampled(sent[0], 11))
    assert output.deltas[0].token_ids == [11]
    (output,) = pipeline.complete(sampled(sent[1], 12))
    assert output.deltas[0].token_ids == [12]
    assert_block_accounting(scheduler)


def test_an_answer_for_another_step_is_refused() -> None:
    scheduler = make()
    scheduler.add_request(req("a", [1, 2, 3], max_tokens=3))
    pipeline = StepPipeline(scheduler, depth=2)
    first, second = pipeline.schedule(), pipeline.schedule()
    with pytest.raises(StepOrderError, match=f"expected step {first.step_id}"):
        pipeline.complete(sampled(second))


def test_empty_steps_are_answered_in_turn_without_being_sent() -> None:
    scheduler = make()
    scheduler.add_request(req("a", [1, 2, 3], max_tokens=1))
    executed: list[int] = []

    def execute(step: StepInput) -> StepOutput:
        executed.append(step.step_id)
        return sampled(step)

    loop = LocalStepLoop(scheduler, execute, depth=2)
    first = loop.step()  # samples the only token
    second = loop.step()  # the placeholder already reaches max_tokens: nothing to do
    assert not is_empty(first) and is_empty(second)
    loop.drain()
    assert executed == [first.step_id]  # the empty step never reached the worker
    assert [output.finished for output in loop.outputs] == [True]
    freeing = loop.step()  # the finished sequence's frees go out with the next step
    assert freeing.freed_seq_ids and executed[-1] == freeing.step_id
    loop.drain()
    assert not scheduler.needs_step() and loop.pipeline.num_in_flight == 0
    assert_block_accounting(scheduler)


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError):
        StepPipeline(make(), depth=0)
