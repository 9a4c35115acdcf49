"""Simulate the gateway's scheduler and block manager on a synthetic workload, no model needed.

    python -m paged.ops.simulate [--num-requests 10000] [--json] ...

Runs the real Scheduler against a simulated worker (ops/sim_worker.py) for each configuration:
paged with prefix caching on, paged with it off, and the contiguous allocator, all with the same
pool. The workload is drawn from a fixed seed and shaped like ShareGPT: log-normal prompt lengths
(10-2000 tokens) and output lengths (10-1000 tokens, ended by EOS; clients ask for max_tokens up
to 1024, which is what the contiguous allocator must reserve), a share of requests starting with
one of a few long system prompts, and a share sampling n=4. All requests arrive at once (offline).
Configurations run in parallel processes (--jobs); wall_s and cpu_s are per configuration.

Besides memory (KV utilization: token slots holding tokens / slots reserved; pool used: blocks
held / all blocks) and speed (steps to finish everything), it reports the work thrown away:
preemptions and the tokens computed again after them (recomputed, and their share of all
computed tokens), and the steps running sequences waited for a block instead (block waits). The scheduler's clock is virtual, SIMULATED_STEP_S per step, so rates and the
thrash detector's window are in simulated seconds and a run is deterministic.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import click

from paged.gateway.request import Request
from paged.gateway.scheduler import Scheduler
from paged.ops.sim_worker import SimulatedWorker, StepLoop
from paged.shared.config import CacheConfig, SchedulerConfig
from paged.shared.logging import configure_logging
from paged.shared.sampling_params import SamplingParams

EOS = 0
VOCAB = 32000
SIMULATED_STEP_S = 0.02  # the scheduler's virtual seconds per step: a decode step of a large batch on a GPU
CONFIGURATIONS = {
    "paged/prefix-on": ("paged", True),
    "paged/prefix-off": ("paged", False),
    "contiguous": ("contiguous", False),
}


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[list[int]]  # per request, one target length per sequence
    max_tokens: int
    n: list[int]


def _log_normal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def make_workload(
    num_requests: int, seed: int, *, max_tokens: int = 1024, shared_prefix_share: float = 0.5, n4_share: float = 0.1
) -> Workload:
    rng = random.Random(seed)
    system_prompts = [
        [rng.randrange(1, VOCAB) for _ in range(_log_normal(rng, 400, 0.5, 100, 1000))] for _ in range(8)
    ]
    prompts, output_lens, ns = [], [], []
    for _ in range(num_requests):
        length = _log_normal(rng, 250, 1.0, 10, 2000)
        prompt = [rng.randrange(1, VOCAB) for _ in range(length)]
        if rng.random() < shared_prefix_share:
            prompt = (rng.choice(system_prompts) + prompt)[:2000]
        n = 4 if rng.random() < n4_share else 1
        prompts.append(prompt)
        ns.append(n)
        output_lens.append([_log_normal(rng, 120, 1.0, 10, 1000) for _ in range(n)])
    return Workload(prompts, output_lens, max_tokens, ns)


def simulate(
    workload: Workload,
    *,
    allocator: str,
    prefix_caching: bool,
    num_blocks: int,
    block_size: int,
    max_model_len: int,
    scheduler_config: SchedulerConfig,
    num_host_blocks: int = 0,
) -> dict[str, float | int]:
    steps_done = 0
    scheduler = Scheduler(
        scheduler_config,
        CacheConfig(block_size=block_size, kv_allocator=allocator, enable_prefix_caching=prefix_caching),
        num_blocks,
        max_model_len,
        num_host_blocks=num_host_blocks,
        clock=lambda: steps_done * SIMULATED_STEP_S,
    )
    targets: dict[int, int] = {}  # seq id -> length (prompt + output) at which it samples EOS
    for index, prompt in enumerate(workload.prompts):
        request = Request(
            f"sim-{index}",
            prompt,
            SamplingParams(n=workload.n[index], max_tokens=workload.max_tokens, seed=index),
            eos_token_ids=frozenset({EOS}),
        )
        for seq, output_len in zip(request.seqs, workload.output_lens[index], strict=True):
            targets[seq.seq_id] = len(prompt) + output_len - 1
        scheduler.add_request(request)
    gc.freeze()  # requests and their token ids live for the whole run: keep the collector off them

    def choose_token(seq_id: int, position: int) -> int:
        return EOS if position >= targets[seq_id] else 1 + position % (VOCAB - 1)

    worker = SimulatedWorker(num_blocks, block_size, verify=False, choose_token=choose_token)
    loop = StepLoop(scheduler, worker, overlapped=True)
    utilization_sum = 0.0
    utilization_steps = 0
    utilization_peak = 0.0
    used_sum = 0
    running_sum = 0
    thrashing_steps = 0
    peak_concurrency = 0
    kv = scheduler.kv
    started = time.perf_counter()
    started_cpu = time.process_time()

    def measure(_step: object) -> None:
        nonlocal utilization_sum, utilization_steps, utilization_peak, peak_concurrency, steps_done
        nonlocal used_sum, running_sum, thrashing_steps
        steps_done += 1
        stats = kv.stats()
        if stats.slots_reserved:
            utilization_sum += stats.kv_utilization
            utilization_steps += 1
            utilization_peak = max(utilization_peak, stats.kv_utilization)
        used_sum += stats.used_blocks
        running_sum += scheduler.num_running
        thrashing_steps += scheduler.figures.thrash.thrashing
        peak_concurrency = max(peak_concurrency, scheduler.num_running)

    steps = loop.run(max_steps=10_000_000, after_step=measure)
    stats = scheduler.stats()
    return {
        "kv_utilization_mean": utilization_sum / utilization_steps if utilization_steps else 0.0,
        "kv_utilization_peak": utilization_peak,
        "pool_used_mean": used_sum / (steps_done * num_blocks) if steps_done else 0.0,
        "running_mean": running_sum / steps_done if steps_done else 0.0,
        "peak_concurrency": peak_concurrency,
        "steps": steps,
        "prefix_hit_rate": stats.prefix_hit_rate,
        "preemptions": stats.preemptions,
        "block_waits": stats.block_waits,
        "evictions": stats.evictions,
        "swapped_out_blocks": stats.swaps_out,
        "tokens_computed": worker.num_tokens_computed,
        "recomputed_tokens": stats.recomputed_tokens,
        "recompute_share": stats.recomputed_tokens / stats.computed_tokens if stats.computed_tokens else 0.0,
        "thrashing_steps": thrashing_steps,
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - started_cpu,
    }


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the cyclic collector off everything allocated so far (gc.freeze), and hand the heap back
    afterwards. A run invoked in-process (the tests, a notebook) must not leave its caller's objects
    frozen: interpreter exit never frees frozen objects, and nanobind (triton's bindings) then reports
    every triton object still alive as leaked."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


_shared: dict[str, object] = {}  # the workload and options, set before the configurations run


def _simulate_named(name: str) -> tuple[str, dict[str, float | int]]:
    allocator, prefix_caching = CONFIGURATIONS[name]
    workload = _shared["workload"]
    assert isinstance(workload, Workload)
    return name, simulate(workload, allocator=allocator, prefix_caching=prefix_caching, **_shared["options"])  # type: ignore[arg-type]


def _print_table(workload_info: dict[str, object], results: dict[str, dict[str, float | int]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"paged simulate: {workload_info['num_requests']} requests, pool {workload_info['num_blocks']} "
                  f"blocks x {workload_info['block_size']} tokens")
    for column in ("configuration", "KV util mean", "KV util peak", "pool used mean", "peak seqs", "steps",
                   "prefix hit rate", "preemptions", "block waits", "tokens computed", "recomputed", "recompute share",
                   "wall s", "cpu s"):
        if column == "configuration":
            table.add_column(column, no_wrap=True, min_width=16)
        else:
            table.add_column(column, justify="right")
    for name, row in results.items():
        table.add_row(
            name,
            f"{row['kv_utilization_mean']:.1%}",
            f"{row['kv_utilization_peak']:.1%}",
            f"{row['pool_used_mean']:.1%}",
            str(row["peak_concurrency"]),
            str(row["steps"]),
            f"{row['prefix_hit_rate']:.1%}",
            str(row["preemptions"]),
            str(row["block_waits"]),
            str(row["tokens_computed"]),
            str(row["recomputed_tokens"]),
            f"{row['recompute_share']:.2%}",
            f"{row['wall_s']:.1f}",
            f"{row['cpu_s']:.1f}",
        )
    console = Console()
    if console.width < 180:  # pipes and narrow terminals: keep one row per configuration
        console = Console(width=180)
    console.print(table)


@click.command()
@click.option("--num-requests", default=10_000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--num-blocks", default=2048, show_default=True, help="KV pool size, the same for every configuration")
@click.option("--block-size", default=16, show_default=True)
@click.option("--max-model-len", default=4096, show_default=True)
@click.option("--max-tokens", default=1024, show_default=True, help="what clients ask for; outputs end by EOS earlier")
@click.option("--max-num-seqs", default=256, show_default=True)
@click.option("--max-num-batched-tokens", default=4096, show_default=True)
@click.option("--scheduling-policy", type=click.Choice(["prefill-first", "decode-first", "priority"]), default="decode-first")
@click.option("--preemption-mode", type=click.Choice(["recompute", "swap", "auto"]), default="recompute")
@click.option("--admission-policy", type=click.Choice(["predictive", "greedy"]), default="predictive", show_default=True)
@click.option("--kv-admission-cap", default=SchedulerConfig().kv_admission_cap, show_default=True,
              help="predictive admission: the share of the pool the expected peak may fill")
@click.option("--num-host-blocks", default=0, show_default=True, help="host pool for --preemption-mode swap")
@click.option("--config", "configs", multiple=True, type=click.Choice(list(CONFIGURATIONS)),
              help="run only these configurations (default: all)")
@click.option("--jobs", default=min(3, os.cpu_count() or 1), show_default=True,
              help="configurations simulated in parallel processes")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of the table")
def main(
    num_requests: int,
    seed: int,
    num_blocks: int,
    block_size: int,
    max_model_len: int,
    max_tokens: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    scheduling_policy: str,
    preemption_mode: str,
    admission_policy: str,
    kv_admission_cap: float,
    num_host_blocks: int,
    configs: tuple[str, ...],
    jobs: int,
    as_json: bool,
) -> None:
    configure_logging("warning", json=False)  # to stderr: kv_thrashing episodes, never into --json's output
    workload = make_workload(num_requests, seed, max_tokens=max_tokens)
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        scheduling_policy=scheduling_policy,
        preemption_mode=preemption_mode,
        admission_policy=admission_policy,
        kv_admission_cap=kv_admission_cap,
        max_waiting_requests=num_requests,
        max_waiting_tokens=sum(len(prompt) for prompt in workload.prompts),
    )
    _shared["workload"] = workload
    _shared["options"] = {
        "num_blocks": num_blocks,
        "block_size": block_size,
        "max_model_len": max_model_len,
        "scheduler_config": scheduler_config,
        "num_host_blocks": num_host_blocks,
    }
    names = list(configs or CONFIGURATIONS)
    with frozen_heap():  # the workload's millions of token ids live to the end of the run
        if jobs > 1 and len(names) > 1:
            # Forked children inherit the workload instead of unpickling millions of token ids.
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(min(jobs, len(names)), mp_context=context) as pool:
                results = dict(pool.map(_simulate_named, names))
        else:
            results = dict(map(_simulate_named, names))
    workload_info = {
        "num_requests": num_requests,
        "seed": seed,
        "num_blocks": num_blocks,
        "block_size": block_size,
        "max_tokens": max_tokens,
        "prompt_tokens": sum(len(prompt) for prompt in workload.prompts),
        "output_tokens": sum(sum(lens) for lens in workload.output_lens),
    }
    if as_json:
        click.echo(json.dumps({"workload": workload_info, "configs": results}))
    else:
        _print_table(workload_info, results)


if __name__ == "__main__":
    main()
