"""Gateway overhead per step, measured against a null worker process over ipc.

    python -m paged.ops.bench_gateway [--seqs 1,64,256] [--steps 400] [--step-ms 0,5] [--model DIR|builtin]

For each number of running sequences (all decoding: short prompts, long max_tokens, ignore_eos)
and each simulated forward time of the null worker (0 = the gateway alone), it prints steps per
second, the gateway's CPU time per step split into schedule / encode+send / decode / update /
dispatch (handing outputs to the request streams), the CPU time of the gateway's event loop
thread per step all included (step loop, request streams consumed by a trivial client, heartbeats),
and the worker's idle fraction while it had work, with overlapped scheduling (two steps in flight) and without (one). `--model` runs a real
worker instead of the null one.

Then, in this process, what predictive admission adds to a schedule() in which a request waits
(nothing waits in the runs above, and then it adds nothing): the running set's demand curve and the
first candidate's, built once per step, and each further candidate's, added to it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import click
import uvloop
from rich.console import Console
from rich.table import Table

from paged.gateway.engine import AsyncEngine
from paged.gateway.replica import StepLoopStats
from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.gateway.worker_processes import RuntimeDir, local_workers
from paged.shared.config import GiB, MiB, CacheConfig, ModelConfig, SchedulerConfig
from paged.shared.logging import configure_logging
from paged.shared.sampling_params import SamplingParams

PROMPT_LEN = 16


@dataclass
class Row:
    seqs: int
    step_ms: float
    steps_in_flight: int
    steps_per_s: float
    schedule_us: float
    send_us: float
    decode_us: float
    update_us: float
    dispatch_us: float
    cpu_us: float  # the gateway's event-loop thread CPU time per step, everything included
    idle_fraction: float

    @property
    def gateway_us(self) -> float:
        return self.schedule_us + self.send_us + self.decode_us + self.update_us + self.dispatch_us


async def measure(engine: AsyncEngine, num_seqs: int, num_steps: int, max_tokens: int) -> tuple[StepLoopStats, float, float, float]:
    """Run `num_seqs` decoding sequences and return the step loop's stats over `num_steps` steps."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    async def consume(index: int) -> None:
        prompt = [1 + (index + k) % 250 for k in range(PROMPT_LEN)]
        async for _ in engine.generate(f"bench-{index}", prompt, params, eos_token_ids=frozenset()):
            pass

    consumers = [asyncio.create_task(consume(i)) for i in range(num_seqs)]
    replica = engine.replicas[0]
    while replica.scheduler is None or replica.scheduler.num_running < num_seqs:  # all admitted and prefilled
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)
    replica.step_stats = stats = StepLoopStats()
    replica.link.decode_s = 0.0
    started, cpu_started = time.perf_counter(), time.thread_time()
    while stats.steps < num_steps:
        await asyncio.sleep(0.05)
    elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    decode_s = replica.link.decode_s
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)
    return stats, elapsed, decode_s, cpu


async def run(seq_counts: list[int], step_ms: list[float], num_steps: int, model: str | None) -> list[Row]:
    rows = []
    null_model = model is None
    model_config = ModelConfig(model=None if model in (None, "builtin") else model, device="cpu")
    cache_config = CacheConfig(kv_cache_memory=(4 * GiB if null_model else 256 * MiB), swap_space=0)
    for step_s in step_ms if null_model else [0.0]:
        runtime = RuntimeDir()
        specs = local_workers(
            runtime, model_config, cache_config, 2048, num_workers=1, null_model=null_model,
            log_level="warning", log_json=False, null_step_s=step_s / 1e3,
        )  # fmt: skip
        for steps_in_flight in (2, 1):
            engine = AsyncEngine(specs, SchedulerConfig(max_num_seqs=max(seq_counts)), cache_config, steps_in_flight=steps_in_flight)
            await engine.start()
            max_tokens = min(engine.max_model_len - PROMPT_LEN, num_steps * 10)
            try:
                for num_seqs in seq_counts:
                    stats, elapsed, decode_s, cpu = await measure(engine, num_seqs, num_steps, max_tokens)
                    per = 1e6 / stats.steps
                    rows.append(
                        Row(num_seqs, step_s, steps_in_flight, stats.steps / elapsed, stats.schedule_s * per,
                            stats.send_s * per, decode_s * per, stats.update_s * per, stats.dispatch_s * per, cpu * per, stats.idle_fraction())
                    )  # fmt: skip
            finally:
                await engine.shutdown()
        runtime.close()
    return rows


def forecast_cost(num_seqs: int, repeats: int = 100) -> tuple[float, float]:
    """Microseconds of CPU of predictive admission's first decision in a step (the running set's
    curve and one candidate's) and of each further one, with `num_seqs` decoding sequences of mixed
    ages and a learned output-length model; the best of `repeats`."""
    block_size, max_tokens = 16, 1024
    num_blocks = num_seqs * (PROMPT_LEN + max_tokens) // block_size + 64
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=num_seqs + 2), CacheConfig(block_size=block_size), num_blocks, 4096)
    for length in range(1, 401):
        scheduler.figures.lengths.observe(length, max_tokens)
    loop = StepLoop(scheduler, SimulatedWorker(num_blocks, block_size, verify=False), overlapped=True)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for index in range(num_seqs):  # admitted a few per step, so that their ages differ
        scheduler.add_request(Request(f"run-{index}", [1 + (index + k) % 250 for k in range(PROMPT_LEN)], params))
        if index % 4 == 3:
            loop.step()
    while scheduler.num_waiting:
        loop.step()
    for _ in range(20):
        loop.step()
    candidates = [Request(f"wait-{index}", [2 + (index + k) % 250 for k in range(PROMPT_LEN)], params) for index in range(2)]
    for request in candidates:
        for seq in request.seqs:
            seq.max_num_tokens = PROMPT_LEN + max_tokens
    predictive, running, config = scheduler.predictive, scheduler.running, scheduler.config
    first = further = float("inf")  # the best of `repeats`, in thread CPU time: the box's other load only adds
    for _ in range(repeats):
        predictive.begin_step()
        started = time.thread_time()
        for index, request in enumerate(candidates):
            seqs = request.live_seqs()
            predictive.fits(request, seqs, [scheduler.kv.probe(seq) for seq in seqs], [], running, [], config)
            now = time.thread_time()
            if index == 0:
                first = min(first, now - started)
            else:
                further = min(further, now - started)
            started = now
    return first * 1e6, further * 1e6


@click.command()
@click.option("--seqs", default="1,64,256", show_default=True, help="Running sequences, comma-separated.")
@click.option("--steps", "num_steps", default=400, show_default=True, help="Steps measured per row.")
@click.option("--step-ms", default="0,5", show_default=True, help="Null worker's simulated forward time, comma-separated.")
@click.option("--model", default=None, help="Run a real worker: a model directory, or 'builtin'.")
def main(seqs: str, num_steps: int, step_ms: str, model: str | None) -> None:
    configure_logging("warning")
    seq_counts = [int(s) for s in seqs.split(",")]
    rows = uvloop.run(run(seq_counts, [float(s) for s in step_ms.split(",")], num_steps, model))
    table = Table(title=f"gateway step loop, {'null worker' if model is None else model} over ipc, {num_steps} steps per row")
    for column in ("seqs", "worker ms", "in flight", "steps/s", "schedule µs", "enc+send µs", "decode µs", "update µs", "dispatch µs", "step loop µs", "loop thread CPU µs", "worker idle"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r.seqs), "model" if model else f"{r.step_ms:g}", str(r.steps_in_flight), f"{r.steps_per_s:.0f}", f"{r.schedule_us:.0f}",
            f"{r.send_us:.0f}", f"{r.decode_us:.0f}", f"{r.update_us:.0f}", f"{r.dispatch_us:.0f}", f"{r.gateway_us:.0f}", f"{r.cpu_us:.0f}", f"{r.idle_fraction:.1%}",
        )  # fmt: skip
    Console(width=160).print(table)
    cost = Table(title="predictive admission in a step where a request waits (in-process, CPU time, best of 100)")
    for column in ("seqs", "first decision µs", "each further decision µs"):
        cost.add_column(column, justify="right")
    for num_seqs in seq_counts:
        first, further = forecast_cost(num_seqs)
        cost.add_row(str(num_seqs), f"{first:.0f}", f"{further:.0f}")
    Console(width=160).print(cost)


if __name__ == "__main__":
    main()
