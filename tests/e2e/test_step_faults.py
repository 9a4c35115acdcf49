"""A step that cannot be encoded, or an item a worker rejects, fails only the requests it concerns:
the link, the worker and every other stream carry on. Faults are injected below the HTTP API's
validation (which refuses out-of-range numbers), straight into the engine."""

from __future__ import annotations

import asyncio

import pytest
import zmq.asyncio

from paged.gateway.worker_link import WorkerLink
from paged.gateway.worker_processes import RuntimeDir
from paged.shared.config import ModelConfig
from paged.shared.protocol import NewSequence, ScheduledSeq, StepInput
from paged.shared.sampling_params import SamplingParams
from support.engine_processes import generate, running_engine, start_split_worker, used_blocks, wait_for

pytestmark = pytest.mark.slow

BEYOND_64_BITS = 1 << 64


async def streams_in_flight(engine, count: int, max_tokens: int) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(generate(engine, f"ok{i}", [1, 2, 3, 4 + i], max_tokens)) for i in range(count)]
    await wait_for(lambda: all(engine.worker_of(f"ok{i}") is not None for i in range(count)))
    return tasks


@pytest.mark.parametrize(
    "prompt, params",
    [
        ([1, 2, 3], {"seed": BEYOND_64_BITS}),
        ([1, 2, 3], {"top_k": -BEYOND_64_BITS}),
        ([1, 2, 3], {"stop_token_ids": (5, BEYOND_64_BITS)}),
        ([1, BEYOND_64_BITS, 3], {}),
    ],
    ids=["seed", "top_k", "stop_token_ids", "prompt_token"],
)
async def test_an_unencodable_sequence_fails_alone(prompt: list[int], params: dict[str, object]) -> None:
    async with running_engine(2, null_step_s=0.01) as engine:
        pids = [replica.link.process.pid for replica in engine.replicas]  # type: ignore[union-attr]
        sessions = [replica.step_stats for replica in engine.replicas]  # replaced when a worker re-registers
        tasks = await streams_in_flight(engine, 6, 40)
        tokens, finish, error = await generate(engine, "bad", prompt, 8, **params)
        assert error is not None and "cannot be sent to the worker" in error and tokens == []
        for tokens, finish, error in await asyncio.gather(*tasks):
            assert error is None and finish == "length" and len(tokens) == 40
        assert all(replica.link.connected and replica.scheduler is not None for replica in engine.replicas)
        assert [replica.link.process.pid for replica in engine.replicas] == pids  # type: ignore[union-attr]
        assert all(replica.step_stats is stats for replica, stats in zip(engine.replicas, sessions))
        assert (await generate(engine, "after", [1, 2, 3], 5))[2] is None
        assert used_blocks(engine) == {"0": 0, "1": 0}
        for replica in engine.replicas:
            assert replica.scheduler.audit().ok  # type: ignore[union-attr]


async def test_an_item_the_worker_rejects_fails_alone() -> None:
    """The built-in model's worker refuses sampling values it cannot honour (a top-logprobs count
    beyond its vocabulary would fail the batch's sampling): the gateway fails that request only."""
    async with running_engine(1, null_model=False, model_config=ModelConfig(device="cpu")) as engine:
        session = engine.replicas[0].step_stats
        prompt = [1, 72, 105, 33]
        tasks = [asyncio.create_task(generate(engine, f"ok{i}", prompt, 30, temperature=0.8, logprobs=2)) for i in range(4)]
        await wait_for(lambda: all(engine.worker_of(f"ok{i}") is not None for i in range(4)))
        tokens, _, error = await generate(engine, "bad", prompt, 8, logprobs=10**6)
        assert error is not None and "logprobs=1000000" in error and tokens == []
        for tokens, finish, error in await asyncio.gather(*tasks):
            assert error is None and finish == "length" and len(tokens) == 30
        assert engine.replicas[0].link.connected and engine.replicas[0].step_stats is session
        assert used_blocks(engine) == {"0": 0}


async def test_an_item_the_worker_cannot_decode_fails_alone() -> None:
    """msgpack carries a string among the prompt's token ids, the worker's typed decoding does not:
    the worker decodes the step item by item, fails that sequence and runs the rest (dropping the
    step would leave its output, and every stream on the worker, waiting forever)."""
    async with running_engine(1, null_step_s=0.01) as engine:
        session = engine.replicas[0].step_stats
        tasks = await streams_in_flight(engine, 4, 30)
        tokens, _, error = await asyncio.wait_for(generate(engine, "bad", [1, "x", 3], 8), 10)  # type: ignore[list-item]
        assert error is not None and "could not decode" in error and tokens == []
        for tokens, finish, error in await asyncio.gather(*tasks):
            assert error is None and finish == "length" and len(tokens) == 30
        assert engine.replicas[0].link.connected and engine.replicas[0].step_stats is session
        assert used_blocks(engine) == {"0": 0}


async def test_a_step_no_sequence_can_be_blamed_for_ends_the_session_not_the_worker() -> None:
    """A step whose own structure does not decode cannot be answered: the worker ends the session
    (falls silent) instead of leaving the gateway waiting forever, and registers again."""
    runtime = RuntimeDir()
    endpoint = runtime.endpoint("blame.sock")
    process = start_split_worker(endpoint)
    context = zmq.asyncio.Context()
    try:
        link = WorkerLink(context, endpoint, name="w", gateway_id="g")
        await link.register(timeout=60)
        await link.send_step(StepInput(0, freed_seq_ids=["x"]))  # type: ignore[list-item]
        await asyncio.wait_for(link.lost.wait(), 5)
        assert "silent" in (link.lost_reason or "")
        await link.register(timeout=10)
        step = StepInput(0, scheduled=[ScheduledSeq(7, 0, 3, 0, [0])], new_seqs=[NewSequence(7, [1, 2, 3], SamplingParams())])
        await link.send_step(step)
        output = await asyncio.wait_for(link.receive(), 5)
        assert [r.seq_id for r in output.results] == [7] and process.poll() is None
        await link.close()
    finally:
        process.kill()
        process.wait(10)
        context.term()
        runtime.close()
