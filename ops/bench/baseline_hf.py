"""The no-server baseline: Hugging Face transformers `generate()` with static batches, as people run a
model without an inference server. A batch is padded on the left to its longest prompt, every sequence
generates the batch's largest max_tokens, and nobody gets an answer before the whole batch is done.

The clock is virtual but honest: requests arrive at the same Poisson times as in the HTTP runs; when the
model is idle it takes up to `batch_size` requests that have arrived (or waits for the next arrival), and
each batch costs the wall-clock time `generate()` really took. Since there is no streaming, a request's
TTFT and latency are both its batch's completion time minus its arrival; TPOT and ITL are the batch's
time per decoding step."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import AutoModelForCausalLM

from paged.ops.bench.loadgen import LoadShape
from paged.ops.bench.results import RequestResult
from paged.ops.bench.server_metrics import ServerStats
from paged.ops.bench.workloads import RequestSpec, arrival_times


class StaticBatchGenerator:
    def __init__(self, model_dir: Path, seed: int) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        config = self.model.generation_config
        eos = config.eos_token_id
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos) or 0
        torch.manual_seed(seed)

    @torch.inference_mode()
    def generate(self, specs: list[RequestSpec]) -> float:
        """Run one static batch to completion; returns the seconds it took."""
        width = max(len(spec.prompt) for spec in specs)
        input_ids = torch.full((len(specs), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(specs), width), dtype=torch.long)
        for row, spec in enumerate(specs):
            input_ids[row, width - len(spec.prompt):] = torch.tensor(spec.prompt)
            attention_mask[row, width - len(spec.prompt):] = 1
        new_tokens = max(spec.max_tokens for spec in specs)
        start = time.perf_counter()
        self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # the equivalent of ignore_eos
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            num_return_sequences=specs[0].n, pad_token_id=self.pad_id,
        )
        return time.perf_counter() - start


def _kv_utilization(specs: list[RequestSpec]) -> float:
    """Slots holding a request's own tokens / slots the padded batch allocates, at the batch's end."""
    width = max(len(spec.prompt) for spec in specs) + max(spec.max_tokens for spec in specs)
    return sum(len(spec.prompt) + spec.max_tokens for spec in specs) / (len(specs) * width)


def run_hf_static(model_dir: Path, specs: list[RequestSpec], shape: LoadShape, batch_size: int,
                  description: str = "hf-static") -> tuple[list[RequestResult], float, ServerStats]:
    generator = StaticBatchGenerator(model_dir, shape.seed)
    generator.generate([RequestSpec(specs[0].prompt[:8], 2, specs[0].n)])  # warm-up, off the clock
    if shape.concurrency:  # closed loop: everything is waiting, at most `concurrency` in a batch
        arrivals, batch_size = [0.0] * len(specs), min(batch_size, shape.concurrency)
    else:
        arrivals = arrival_times(len(specs), shape.request_rate, shape.seed)
    results: list[RequestResult] = []
    utilization: list[tuple[float, float]] = []  # (batch seconds, its utilization)
    peak_sequences, clock, next_index = 0, 0.0, 0
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as progress:
        task = progress.add_task(description, total=len(specs))
        while next_index < len(specs):
            clock = max(clock, arrivals[next_index])
            batch = [i for i in range(next_index, min(next_index + batch_size, len(specs))) if arrivals[i] <= clock]
            batch_specs = [specs[i] for i in batch]
            seconds = generator.generate(batch_specs)
            clock += seconds
            step = seconds / max(spec.max_tokens for spec in batch_specs)
            for i, spec in zip(batch, batch_specs):
                results.append(RequestResult(
                    outcome="completed", prompt_tokens=len(spec.prompt), output_tokens=spec.max_tokens * spec.n,
                    ttft=clock - arrivals[i], latency=clock - arrivals[i], tpot=step,
                    itls=[step] * ((spec.max_tokens - 1) * spec.n), kind=spec.kind,
                ))
            utilization.append((seconds, _kv_utilization(batch_specs)))
            peak_sequences = max(peak_sequences, len(batch) * batch_specs[0].n)
            next_index += len(batch)
            progress.update(task, advance=len(batch))
    busy = sum(seconds for seconds, _ in utilization)
    stats = ServerStats(
        kv_utilization_mean=sum(seconds * u for seconds, u in utilization) / busy,
        kv_utilization_peak=max(u for _, u in utilization),
        peak_concurrency=peak_sequences, prefix_hit_rate=0.0, preemptions=0, block_waits=0, recomputed_tokens=0,
        recompute_share=0.0, thrashing_share=0.0,
    )
    return results, clock - arrivals[0], stats
